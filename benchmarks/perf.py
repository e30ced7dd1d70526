"""``carrot bench perf``: the stage-1 and stage-2 benchmarks in one table and one JSON.

Each figure is a ratio against a baseline measured in the same run (bare forward, plain step,
single head / sequential heads, ``np.load``, matmul rate, the same training on an idle machine).
Figures from a CUDA GPU carry the card's name and are kept apart from CPU figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._report import describe_machine
from benchmarks._report import format_table as report_table


def _rows(section: str, where: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalise each benchmark's rows to: section, device, metric, value, ratio, target."""
    out = []
    for r in rows:
        metric = r.get("metric") or r.get("variant")
        ratio = r.get("ratio")
        if ratio is None and r.get("unit") in ("time ratio", "of matmul"):
            ratio = r.get("value")
        value = r.get("value", r.get("median_ms"))
        out.append(
            {
                "section": section,
                "device": where,
                "metric": metric,
                "value": value,
                "ratio": ratio,
                "target": r.get("target"),
            }
        )
    return out


def run(quick: bool = False, device: str = "auto") -> dict[str, Any]:
    """Run embed, carrot_step, heads_bank (and probe_parity on a CPU) on ``device``; return
    rows + machine."""
    from benchmarks import carrot_step, heads_bank, probe_parity, startup
    from benchmarks import embed as embed_bench

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = "cuda" if cuda else "cpu"
    machine = describe_machine()
    where = (
        f"GPU {machine['gpu']}"
        if cuda
        else f"CPU {machine['cpu']} ({machine['torch_threads']} threads)"
    )
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    e = embed_bench.run(quick=quick, device=dev)
    rows += _rows("stage 1: embed", where, e["rows"])
    c = carrot_step.run(quick=quick, device=dev)
    step_rows = [
        dict(r, metric=f"step {r['variant']} (ms, {c['threads']} thread(s))", value=r["median_ms"])
        for r in c["rows"]
    ]
    rows += _rows("stage 2: CARROT step", where, step_rows)
    h = heads_bank.run(quick=quick, device=dev, json_path=None)
    busy = [r for r in h["rows"] if r["metric"].startswith("busy_machine")]  # CPU only
    rows += _rows("stage 2: head bank", where, [r for r in h["rows"] if r not in busy])
    busy = [dict(r, metric=f"{r['metric']} — {r['detail']}") for r in busy]
    rows += _rows("stage 2: plain bank beside a busy process / idle", where, busy)
    if not cuda:  # the probe against scikit-learn (CPU, single-threaded on both sides)
        p = probe_parity.run(quick=quick, json_path=None)
        parity_rows = (
            [
                {
                    "metric": f"probe − LR, {r['data']} (points)",
                    "value": r["Δ points"],
                    "target": f">= {probe_parity.TARGET_POINTS}",
                }
                for r in p["rows"]
            ]
            + [
                {
                    "metric": f"probe time / LR sweep time, {r['data']}",
                    "value": r["time ratio"],
                    "unit": "time ratio",
                    "target": "<= 1",
                }
                for r in p["rows"]
            ]
            + [
                {
                    "metric": f"default bank / --aug none bank time, {r['data']}",
                    "value": r["default/plain"],
                    "unit": "time ratio",
                    "target": f"<= {probe_parity.TARGET_BANK_RATIO}",
                }
                for r in p["rows"]
            ]
        )
        rows += _rows("stage 2: probe vs logistic regression", where, parity_rows)
    st = startup.run(quick=quick)  # new processes: device-independent
    start_rows = [
        {
            "metric": f"carrot embed cache hit, {r['path']}: wall − work (s)",
            "value": r["overhead_s"],
            "ratio": r["ratio_to_bare_import"],
            "target": f"<= {startup.TARGET} × bare import" if r["target"] else None,
        }
        for r in st["rows"]
    ]
    rows += _rows("start-up (new process)", "CPU", start_rows)
    return {
        "machine": machine,
        "device": where,
        "rows": rows,
        "quick": quick,
        "seconds": time.perf_counter() - t0,
        "sizes": {"embed": e["sizes"], "carrot_step": c["sizes"], "heads_bank": h["sizes"]},
        "busy_machine": h.get("busy_machine"),  # seconds, threads, other processes' load
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of every figure, with the device and torch version on top."""
    cols = ("section", "metric", "value", "ratio", "target")
    head = f"carrot bench perf — {result['device']}, torch {result['machine']['torch']}"
    return "\n".join([head, *report_table(cols, result["rows"], digits=3, left=True)])


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
