"""Head-bank throughput (the minibatch path; the probe's accuracy is `benchmarks.probe_parity`).

Measured in one run, on one device (timings are medians over interleaved repeats):

1. ``bank_vs_sequential`` — one training epoch of 16 heads in one bank vs 16 single-head runs
   one after the other (N=6000, D=768, C=200: CUB-sized; random features). Target ≤ 0.7.
2. ``flop_fraction`` — the bank's matmul FLOP rate (4·N·D·H·C per epoch: forward and weight
   gradient) over torch's rate for the same (B×D)·(D×H·C) matmul measured now. Target ≥ 0.5.
3. ``bank16_vs_one`` — one epoch of 16 heads over one epoch of 1 head. Target ≤ 2 on CUDA
   (on a CPU the bank is compute-bound and the ratio is reported without a target).

    python -m benchmarks.heads_bank [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._report import median_time, write_report
from pipeline.heads.bank import HeadGrid
from pipeline.heads.features import FeatureSet
from pipeline.heads.train import TrainConfig, fit_bank

DEFAULT_JSON = Path(__file__).parent / "results" / "heads_bank.json"
TARGETS = {
    "bank_vs_sequential": ("<=", 0.7),
    "flop_fraction": (">=", 0.5),
    "bank16_vs_one": ("<=", 2.0),  # CUDA only
}
N, D, C, H = 6000, 768, 200, 16


def _random_features(device: str, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((C, D)).astype(np.float32)
    y = rng.integers(0, C, N)
    X = means[y] + 2.0 * rng.standard_normal((N, D)).astype(np.float32)
    return FeatureSet.from_arrays({"train": (X, y)}, device=device)


def _grid16() -> HeadGrid:
    return HeadGrid.from_lists(lrs=[1e-3, 3e-3, 1e-2, 3e-2], weight_decays=[0.0, 1e-2, 1e-1, 1.0])


def _timings(device: str, repeats: int, batch_size: int) -> dict[str, float]:
    """Median seconds per epoch: bank of 16, 16 sequential singles, one single; matmul rate."""
    fs = _random_features(device)
    specs = _grid16().specs
    cfg = TrainConfig(  # one minibatch epoch, never stopped early
        solver="minibatch", epochs=1, min_steps=0, tol=0.0, batch_size=batch_size, device=device
    )

    def bank() -> None:
        fit_bank(fs, specs, cfg, val_split=None)

    def one() -> None:
        fit_bank(fs, specs[:1], cfg, val_split=None)

    def sequential() -> None:
        for spec in specs:
            fit_bank(fs, [spec], cfg, val_split=None)

    fns = {"bank": bank, "sequential": sequential, "one": one}
    for fn in fns.values():  # warm-up (lazy imports, allocator, kernels)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so load changes hit every variant alike
        for name, fn in fns.items():
            times[name].append(median_time(fn, repeats=1, warmup=0))
    out = {k: statistics.median(v) for k, v in times.items()}

    a = torch.randn(batch_size, D, device=device)
    w = torch.randn(H * C, D, device=device)
    mm = median_time(lambda: a @ w.t(), repeats=max(10, 5 * repeats), warmup=3)
    out["matmul_flops_per_s"] = 2 * batch_size * D * H * C / mm
    out["bank_flops_per_s"] = 4 * N * D * H * C / out["bank"]
    return out


def _row(metric: str, value: float, *, applies: bool = True, unit: str = "") -> dict[str, Any]:
    op, target = TARGETS[metric]
    met = (value <= target if op == "<=" else value >= target) if applies else None
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "target": f"{op} {target}" if applies else "n/a (CUDA only)",
        "met": met,
    }


def run(
    quick: bool = False,
    device: str = "cpu",
    *,
    json_path: str | Path | None = DEFAULT_JSON,
) -> dict[str, Any]:
    """Run all measurements; print the table, write JSON; returns the rows and raw numbers."""
    repeats = 3 if quick else 7
    t = _timings(device, repeats, batch_size=256)
    cuda = device.startswith("cuda")
    rows = [
        _row("bank_vs_sequential", t["bank"] / t["sequential"], unit="time ratio"),
        _row("flop_fraction", t["bank_flops_per_s"] / t["matmul_flops_per_s"], unit="of matmul"),
        _row("bank16_vs_one", t["bank"] / t["one"], applies=cuda, unit="time ratio"),
    ]
    raw = {
        "sizes": {"N": N, "D": D, "C": C, "H": H, "batch_size": 256},
        "seconds_per_epoch": {k: t[k] for k in ("bank", "sequential", "one")},
        "gflops": {
            "bank": t["bank_flops_per_s"] / 1e9,
            "matmul": t["matmul_flops_per_s"] / 1e9,
        },
        "quick": quick,
        "device": device,
        # other processes on the machine skew CPU timings (2 OpenMP threads on 2 busy cores
        # slowed small steps 10x+ here): keep the load next to the numbers
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    write_report("heads_bank", rows, json_path=json_path, extra=raw)
    return {"rows": rows, **raw}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under ~60 s on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, args.device, json_path=args.json)


if __name__ == "__main__":
    main()
