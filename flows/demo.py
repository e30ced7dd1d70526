"""Prefect flow ``demo``: digits → stage 1 → head banks with and without CARROT → a table.

Everything runs offline on a CPU: scikit-learn's digits, a randomly initialised timm backbone
(no weights can be downloaded here), and head banks over the cached features.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.embed import embed_flow
from flows.train import train_head_flow
from pipeline.embed.run import EmbedSettings
from pipeline.heads.io import atomic_file, write_json
from pipeline.heads.probe import ProbeSettings
from pipeline.plots import plot_method_comparison

# (row label, augmentations in the bank, shots per class)
DEMO_RUNS: tuple[tuple[str, tuple[str, ...], int | None], ...] = (
    ("plain head", ("none",), None),
    ("CARROT", ("carrot",), None),
    ("plain head", ("none",), 5),
    ("CARROT", ("carrot",), 5),
)


@flow(name="demo", log_prints=False, validate_parameters=False)
def demo_flow(embed: EmbedSettings, probe: ProbeSettings, out: str) -> dict:
    """Embed digits, train plain and CARROT head banks (full data and 5-shot), compare."""
    stage1 = embed_flow(embed)
    rows = []
    for i, (label, augs, shots) in enumerate(DEMO_RUNS):
        settings = dataclasses.replace(  # the baseline once, beside the first full-data bank
            probe, augs=augs, shots=shots, baseline=probe.baseline and i == 0
        )
        tag = f"{'-'.join(augs)}-{'full' if shots is None else f'{shots}shot'}"
        s = train_head_flow(stage1["store"], settings, str(Path(out) / tag))
        regime = "all data" if shots is None else f"{shots} shots/class"
        rows.append(_row(label, regime, s))
        if "baseline" in s:
            rows.append(_row("logistic regression (sklearn)", regime, s["baseline"]))
    table = {"store": stage1["store"], "embed": stage1, "rows": rows, "out": out}
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / "demo.json", json.loads(json.dumps(table, default=str)))
    with atomic_file(Path(out) / "comparison.png") as tmp:  # replaced whole, never half-written
        plot_method_comparison(rows, tmp)
    create_markdown_artifact(key="demo-comparison", markdown=markdown_table(rows))
    return table


def _row(method: str, regime: str, s: dict) -> dict:
    return {
        "method": method,
        "regime": regime,
        "top1": s.get("top1"),
        "top1_std": (s.get("std") or {}).get("top1"),
        "mean_per_class": s.get("mean_per_class"),
        "best_head": s.get("best_head"),
        "carrot": s.get("carrot_diagnostics"),
    }


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table (top-1 and mean per-class accuracy, %)."""
    lines = ["| regime | method | top-1 % | mean per-class % |", "|---|---|---|---|"]
    lines += [
        f"| {r['regime']} | {r['method']} | {_pct(r['top1'], r['top1_std'])} | "
        f"{_pct(r['mean_per_class'])} |"
        for r in rows
    ]
    return "\n".join(lines)
