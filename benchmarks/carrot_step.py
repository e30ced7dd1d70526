"""CARROT training-step cost over a plain head step (LayerNorm + Linear, AdamW).

Variants on the same cached-feature batch: ``plain`` (no augmentation), ``carrot_class`` and
``carrot_sample`` (``CarrotAugment`` + ``carrot_loss``), and ``seed_loop`` (the seed sketch's
per-sample loop, ``benchmarks/seed_reference.py``). Steps of all variants are interleaved and
each is reported as the median over repeats, with its ratio to ``plain``.

A second table (``run_wide_k``) measures one ``carrot_augment`` call with many competitors:
C = 1000, D = 128, B = 256, K = C − 1 = 999 against K = D = 128, per mode — median time and
peak memory (CPU: peak RSS of a fresh process per case; CUDA: peak allocated), with their
ratios to the K = D call (target: at most 2).

    python -m benchmarks.carrot_step [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
                                     [--wide-json PATH] [--skip-step] [--skip-wide-k]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._report import median_time, write_report
from benchmarks.seed_reference import SeedCarrotFeatureAug, seed_train_step
from pipeline.augment.carrot import CarrotAugment, CarrotConfig, carrot_augment, carrot_loss
from pipeline.augment.nuisance import linear_logits_error
from pipeline.denormals import flush_denormals
from pipeline.threads import step_work, thread_policy

DEFAULT_JSON = Path(__file__).parent / "results" / "carrot_step.json"
DEFAULT_WIDE_JSON = Path(__file__).parent / "results" / "carrot_wide_k.json"
# Targets: CARROT step time over the plain step.
TARGETS = {"carrot_class": 2.2, "carrot_sample": 4.0}
# Target: a K = C − 1 call over the K = D call (time and peak memory).
WIDE_K_TARGET = 2.0
WIDE_K_SIZES = {"B": 256, "D": 128, "C": 1000}


def _sizes(device: str) -> dict[str, int]:
    if device.startswith("cuda"):
        return {"B": 1024, "D": 1024, "C": 1000, "K": 10}
    return {"B": 256, "D": 768, "C": 200, "K": 10}


def _problem(b: int, d: int, c: int, device: str, seed: int = 0):
    """Cached-feature batch x (B, D), labels y (B,), and a head that already fits them."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    x = 3.0 + 2.0 * (means[y] + 0.5 * torch.randn(b, d, generator=g))
    ln, head = nn.LayerNorm(d), nn.Linear(d, c, bias=False)
    with torch.no_grad():
        head.weight.copy_(0.1 * F.layer_norm(means, (d,)))  # a trained-looking head
    return x.to(device), y.to(device), ln.to(device), head.to(device)


def _steps(x, y, ln, head, k: int, device: str) -> dict[str, Callable[[], dict]]:
    """One closure per variant; each runs a full training step and returns its diagnostics."""

    def make(variant: str):
        norm, lin = copy.deepcopy(ln), copy.deepcopy(head)
        opt = torch.optim.AdamW([*norm.parameters(), *lin.parameters()], lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(1)
        if variant == "seed_loop":
            seed = SeedCarrotFeatureAug(topk=k)
            return lambda: {"loss": seed_train_step(x, y, norm, lin, seed, opt)}
        aug = None
        if variant != "plain":
            aug = CarrotAugment(CarrotConfig(topk=k, mode=variant.removeprefix("carrot_")))

        def step() -> dict:
            opt.zero_grad(set_to_none=True)
            z = norm(x)
            logits = lin(z)
            if aug is None:
                loss = F.cross_entropy(logits, y)
                diag = {}
            else:
                err = linear_logits_error(z, lin.weight)  # margins read off the logits
                out = aug(z, y, logits, lin.weight, generator=gen, logits_error=err, measure=False)
                loss = carrot_loss(lin.weight, z, y, out, 1.0, logits=logits)  # + violations
                diag = out.diagnostics
            loss.backward()
            opt.step()
            return diag

        return step

    return {name: make(name) for name in ("plain", "carrot_class", "carrot_sample", "seed_loop")}


def run(
    quick: bool = False,
    device: str = "cpu",
    *,
    sizes: dict[str, int] | None = None,
    threads: int | None = None,
) -> dict:
    """Measure every variant; returns ``{"rows": [...], "sizes": {...}, "device", "quick",
    "threads"}``.

    ``sizes`` (keys B, D, C, K) overrides the default problem for ``device``. CPU threads: as
    `carrot train` picks them for a step of this size (`pipeline.threads.thread_policy`: one
    here), or ``threads``; denormals flushed, as `carrot train` does (`pipeline.denormals`:
    without it this problem's well-fit head made every variant's weight-gradient GEMM 17×
    slower on this CPU).
    """
    sizes = sizes or _sizes(device)
    work = step_work(sizes["B"], sizes["D"], 1, sizes["C"])
    with thread_policy(work, threads, device=device) as used, flush_denormals():
        result = _run(quick, device, sizes)
    return result | {"threads": used}


def _run(quick: bool, device: str, sizes: dict[str, int]) -> dict:
    x, y, ln, head = _problem(sizes["B"], sizes["D"], sizes["C"], device)
    steps = _steps(x, y, ln, head, sizes["K"], device)
    repeats = {"fast": 15 if quick else 60, "seed_loop": 3 if quick else 10}
    times: dict[str, list[float]] = {name: [] for name in steps}
    diagnostics: dict[str, dict] = {}
    for name, step in steps.items():  # warm up (allocations, first geometry)
        for _ in range(1 if name == "seed_loop" else 3):
            step()
    for rep in range(repeats["fast"]):  # interleave the variants: load changes hit all alike
        for name, step in steps.items():
            if name == "seed_loop" and rep >= repeats["seed_loop"]:
                continue
            times[name].append(
                median_time(
                    lambda step=step, name=name: diagnostics.update({name: step()}),
                    repeats=1,
                    warmup=0,
                )
            )
    plain = statistics.median(times["plain"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        diag = diagnostics.get(name) or {}
        rows.append(
            {
                "variant": name,
                "median_ms": 1e3 * median,
                "mean_ms": 1e3 * statistics.fmean(samples),
                "ratio": median / plain,
                "target": TARGETS.get(name),
                "frac_aug": float(diag["frac_augmented"]) if "frac_augmented" in diag else None,
                "viol_rate": float(diag["violation_rate"]) if "violation_rate" in diag else None,
                "repeats": len(samples),
            }
        )
    return {"rows": rows, "sizes": sizes, "device": device, "quick": quick}


def _wide_k_case(
    mode: str, k: int, sizes: dict[str, int], device: str, repeats: int, threads: int | None
) -> dict:
    """Time ``repeats`` calls (after one warm-up) of ``carrot_augment`` with ``topk=k``.

    ``peak_mb``: the peak extra memory of a call — CUDA: peak allocated; CPU: peak RSS of this
    process above its RSS before the first call (meaningful in a fresh process).
    """
    if threads:
        torch.set_num_threads(threads)
    x, y, ln, head = _problem(sizes["B"], sizes["D"], sizes["C"], device)
    with torch.no_grad():
        z = ln(x)
        logits = head(z)
    cfg = CarrotConfig(topk=k, mode=mode)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    gen = torch.Generator(device=device).manual_seed(1)

    def call() -> dict:
        return carrot_augment(z, y, logits, head.weight, cfg, generator=gen).diagnostics

    diag = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        diag = call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is in KiB on Linux
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    return {
        "variant": f"wide_k_{mode}",
        "K": k,
        "median_ms": 1e3 * statistics.median(times),
        "peak_mb": peak / 2**20,
        "frac_aug": float(diag["frac_augmented"]),
        "repeats": repeats,
    }


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _wide_k_worker(queue, *args) -> None:
    queue.put(_wide_k_case(*args))


def _isolated(*args) -> dict:
    """:func:`_wide_k_case` in a fresh (spawned) process, so its peak RSS is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_wide_k_worker, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run_wide_k(
    device: str = "cpu",
    *,
    sizes: dict[str, int] | None = None,
    repeats: int = 3,
    isolate: bool = True,
    threads: int | None = None,
) -> dict:
    """K = C − 1 vs K = D ``carrot_augment`` calls per mode: rows with time and memory ratios.

    ``isolate`` runs each CPU case in a fresh process (peak RSS per case); CUDA cases run here.
    """
    sizes = sizes or dict(WIDE_K_SIZES)
    widths = (sizes["D"], sizes["C"] - 1)
    rows = []
    for mode in ("sample", "class"):
        cases = []
        for k in widths:
            args = (mode, k, sizes, device, repeats, threads or torch.get_num_threads())
            fresh = isolate and not device.startswith("cuda")
            cases.append(_isolated(*args) if fresh else _wide_k_case(*args))
        ref = cases[0]
        for case in cases:
            case["time_ratio"] = case["median_ms"] / ref["median_ms"]
            case["mem_ratio"] = case["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
            case["target"] = WIDE_K_TARGET if case is not ref else None
        rows += cases
    return {"rows": rows, "sizes": sizes, "device": device}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the step as carrot train runs it; wide-K: torch's)",
    )
    parser.add_argument("--wide-json", default=str(DEFAULT_WIDE_JSON), help="wide-K JSON report")
    parser.add_argument("--skip-step", action="store_true", help="only the wide-K table")
    parser.add_argument("--skip-wide-k", action="store_true", help="only the step table")
    args = parser.parse_args(argv)
    if not args.skip_step:
        result = run(quick=args.quick, device=args.device, threads=args.threads)
        sizes = result["sizes"]
        name = "carrot_step B={B} D={D} C={C} K={K} on {device}, {threads} thread(s)".format(
            **sizes, device=args.device, threads=result["threads"]
        )
        extra = {"sizes": sizes, "quick": args.quick, "threads": result["threads"]}
        write_report(name, result["rows"], json_path=args.json, extra=extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_wide_k:
        wide = run_wide_k(args.device, repeats=2 if args.quick else 3, threads=args.threads)
        name = "carrot_augment K=C-1 vs K=D, B={B} D={D} C={C} on {device}".format(
            **wide["sizes"], device=args.device
        )
        write_report(name, wide["rows"], json_path=args.wide_json, extra={"sizes": wide["sizes"]})


if __name__ == "__main__":
    main()
