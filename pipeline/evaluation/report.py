"""Write the quality benchmark's results: JSON (every record + summary), markdown, plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation.protocol import Record
from pipeline.plots import plot_accuracy_vs_shots


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(rows: Sequence[dict[str, Any]], *, header: str = "") -> str:
    """One table per data set: accuracy (mean [95 % CI]) and the paired difference to plain."""
    out = [header] if header else []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        out += [
            f"\n**{dataset}** — test top-1 %, mean [95 % CI] over seeds; Δ = paired difference "
            "to the plain head (same seed, same shots), with its 95 % CI and wins/losses\n",
            "| shots | method | top-1 | mean per-class | Δ top-1 vs plain | wins/losses |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["dataset"] == dataset):
            diff = (
                "—"
                if r["method"] == "plain"
                else f"{100 * r['diff_vs_plain']:+.1f} [{100 * r['diff_lo']:+.1f}, "
                f"{100 * r['diff_hi']:+.1f}]"
            )
            wl = "—" if r["method"] == "plain" else f"{r['wins']}/{r['losses']}"
            out.append(
                f"| {r['shots']} | {r['method']} | {_pct(r['top1'])} [{_pct(r['top1_lo'])}, "
                f"{_pct(r['top1_hi'])}] | {_pct(r['mean_per_class'])} | {diff} | {wl} |"
            )
    return "\n".join(out) + "\n"


def write_quality_report(
    records: Sequence[Record],
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    meta: dict[str, Any],
) -> dict[str, Path]:
    """``quality.json``, ``quality.md`` and ``quality_<dataset>.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "markdown": out / "quality.md"}
    paths["json"].write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": list(rows),
                "records": [dataclasses.asdict(r) for r in records],
            },
            indent=2,
            default=str,
        )
    )
    paths["markdown"].write_text(markdown(rows, header="# carrot bench quality\n"))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        curves: dict[str, list[tuple[float, float, float, float]]] = {}
        for r in rows:
            if r["dataset"] == dataset:
                shots = float("inf") if r["shots"] == "all" else float(r["shots"])
                curves.setdefault(r["method"], []).append(
                    (shots, r["top1"], r["top1_lo"], r["top1_hi"])
                )
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in dataset)
        paths[f"plot-{safe}"] = plot_accuracy_vs_shots(
            curves, out / f"quality_{safe}.png", title=f"{dataset}: test top-1 vs shots"
        )
    return paths
