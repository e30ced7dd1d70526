"""Head-bank throughput (the minibatch path; the probe's accuracy is `benchmarks.probe_parity`).

Measured in one run, on one device (timings are medians over interleaved repeats):

1. ``bank_vs_sequential`` — one training epoch of 16 heads in one bank vs 16 single-head runs
   one after the other (N=6000, D=768, C=200: CUB-sized; random features). Target ≤ 0.7.
2. ``flop_fraction`` — the bank's matmul FLOP rate (4·N·D·H·C per epoch: forward and weight
   gradient) over torch's rate for the same (B×D)·(D×H·C) matmul measured now. Target ≥ 0.5.
3. ``bank16_vs_one`` — one epoch of 16 heads over one epoch of 1 head. Target ≤ 2 on CUDA
   (on a CPU the bank is compute-bound and the ratio is reported without a target).
4. ``busy_machine`` (CPU only) — `train_head_bank` of the plain bank ``carrot train --aug none``
   trains (one head per λ of the default grid, L-BFGS) on digits pixels, timed on the machine as
   it is ("idle"), then beside one busy-loop process (``multiprocessing``), medians over
   repeats; the figure is busy / idle time with the thread policy (`pipeline.threads`, target
   ≤ 2.5), and the same with torch's thread count as it was (what the policy buys). CPU time
   used by other processes during each phase is reported next to it (from ``/proc/stat``; a
   lower bound while the busy loop and the fits fill every core).

    python -m benchmarks.heads_bank [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
                                    [--only throughput|busy_machine]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._report import median_time, write_report
from benchmarks.probe_parity import digits_pixels
from pipeline.heads.bank import HeadGrid
from pipeline.heads.features import FeatureSet
from pipeline.heads.train import TrainConfig, fit_bank
from pipeline.threads import THREADS_FROM_WORK, threads_for

DEFAULT_JSON = Path(__file__).parent / "results" / "heads_bank.json"
TARGETS = {
    "bank_vs_sequential": ("<=", 0.7),
    "flop_fraction": (">=", 0.5),
    "bank16_vs_one": ("<=", 2.0),  # CUDA only
    "busy_machine": ("<=", 2.5),  # CPU only: busy / idle time of the plain bank, thread policy
}
MEASUREMENTS = ("throughput", "busy_machine")
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


def _busy_loop(ready) -> None:  # the competing process: one core, pure Python
    ready.set()
    while True:
        pass


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot (Linux), else None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


class _OtherLoad:
    """Cores used during the block by processes other than this one (and ``minus`` more)."""

    def __init__(self, minus: float = 0.0) -> None:
        self.minus, self.cores = minus, None

    def __enter__(self) -> _OtherLoad:
        self._jiffies, self._own, self._t = _cpu_jiffies(), sum(os.times()[:2]), time.time()
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_jiffies()
        wall = time.time() - self._t
        if end is None or self._jiffies is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (end[0] - self._jiffies[0]) / hz / wall
        own = (sum(os.times()[:2]) - self._own) / wall
        self.cores = max(0.0, busy - own - self.minus)


def _busy_machine(repeats: int) -> dict[str, Any]:
    """Seconds of the plain bank idle and beside one busy loop, with the policy and without."""
    from pipeline.heads.probe import ProbeSettings, build_grid
    from pipeline.heads.search import bank_step_work, train_head_bank

    fs = digits_pixels()
    grid = build_grid(ProbeSettings(augs=("none",)))
    cfg = TrainConfig()
    default_threads = torch.get_num_threads()
    work = bank_step_work(
        grid.specs, cfg, rows=fs.num_rows("train"), dim=fs.dim, classes=fs.num_classes
    )
    variants = {"policy": None, "default": default_threads}  # threads= of train_head_bank

    def fit(threads: int | None) -> None:
        train_head_bank(fs, grid, cfg, threads=threads)

    for threads in variants.values():  # warm-up: imports, first-call costs
        fit(threads)

    def phase(minus: float) -> tuple[dict[str, float], float | None]:
        times: dict[str, list[float]] = {k: [] for k in variants}
        with _OtherLoad(minus) as load:
            for r in range(repeats):  # interleaved, alternating which variant goes first
                order = list(variants.items())
                for name, threads in order if r % 2 == 0 else order[::-1]:
                    times[name].append(median_time(lambda t=threads: fit(t), repeats=1, warmup=0))
        return {k: statistics.median(v) for k, v in times.items()}, load.cores

    idle, idle_load = phase(0.0)
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
    ready = ctx.Event()
    proc = ctx.Process(target=_busy_loop, args=(ready,), daemon=True)
    proc.start()
    try:
        if not ready.wait(timeout=120):
            raise RuntimeError("the busy-loop process did not start")
        busy, busy_load = phase(1.0)
    finally:
        proc.terminate()
        proc.join()
    return {
        "data": "digits pixels",
        "heads": len(grid),
        "rows": fs.num_rows("train"),
        "dim": fs.dim,
        "classes": fs.num_classes,
        "step_work": work,
        "threads_from_work": THREADS_FROM_WORK,
        "threads": {"policy": threads_for(work), "default": default_threads},
        "seconds": {"idle": idle, "busy": busy},
        "ratio": {k: busy[k] / idle[k] for k in variants},
        "other_load_cores": {"idle": idle_load, "busy": busy_load},
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
    }


def _busy_rows(b: dict[str, Any]) -> list[dict[str, Any]]:
    op, target = TARGETS["busy_machine"]
    policy, default = b["threads"]["policy"], b["threads"]["default"]
    return [
        {
            "metric": "busy_machine",
            "value": b["ratio"]["policy"],
            "unit": "time ratio",
            "target": f"{op} {target}",
            "met": b["ratio"]["policy"] <= target,
            "detail": f"policy: {policy} thread(s), idle {b['seconds']['idle']['policy']:.3g} s, "
            f"busy {b['seconds']['busy']['policy']:.3g} s",
        },
        {
            "metric": "busy_machine (torch's threads)",
            "value": b["ratio"]["default"],
            "unit": "time ratio",
            "target": "n/a (reference)",
            "met": None,
            "detail": f"{default} thread(s), idle {b['seconds']['idle']['default']:.3g} s, "
            f"busy {b['seconds']['busy']['default']:.3g} s",
        },
    ]


def run(
    quick: bool = False,
    device: str = "cpu",
    *,
    json_path: str | Path | None = DEFAULT_JSON,
    only: Sequence[str] = MEASUREMENTS,
) -> dict[str, Any]:
    """Run the measurements in ``only`` (all by default; ``busy_machine`` on a CPU only); print
    the table, write JSON; returns the rows and raw numbers."""
    repeats = 3 if quick else 7
    cuda = device.startswith("cuda")
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"quick": quick, "device": device}
    if "throughput" in only:
        t = _timings(device, repeats, batch_size=256)
        rows += [
            _row("bank_vs_sequential", t["bank"] / t["sequential"], unit="time ratio"),
            _row(
                "flop_fraction", t["bank_flops_per_s"] / t["matmul_flops_per_s"], unit="of matmul"
            ),
            _row("bank16_vs_one", t["bank"] / t["one"], applies=cuda, unit="time ratio"),
        ]
        raw |= {
            "sizes": {"N": N, "D": D, "C": C, "H": H, "batch_size": 256},
            "seconds_per_epoch": {k: t[k] for k in ("bank", "sequential", "one")},
            "gflops": {
                "bank": t["bank_flops_per_s"] / 1e9,
                "matmul": t["matmul_flops_per_s"] / 1e9,
            },
        }
    if "busy_machine" in only and not cuda:
        raw["busy_machine"] = _busy_machine(repeats)
        rows += _busy_rows(raw["busy_machine"])
    # other processes on the machine skew CPU timings (2 OpenMP threads on 2 busy cores
    # slowed small steps 10x+ here): keep the load next to the numbers
    raw["load_avg_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_report("heads_bank", rows, json_path=json_path, extra=raw)
    return {"rows": rows, **raw}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under ~60 s on a CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--only", choices=MEASUREMENTS, action="append", help="only this (repeatable)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.quick, args.device, json_path=args.json, only=args.only or MEASUREMENTS)


if __name__ == "__main__":
    main()
