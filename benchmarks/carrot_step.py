"""CARROT training-step cost over a plain head step (LayerNorm + Linear, AdamW).

Variants on the same cached-feature batch: ``plain`` (no augmentation), ``carrot_class`` and
``carrot_sample`` (``CarrotAugment`` + ``carrot_loss``), and ``seed_loop`` (the seed sketch's
per-sample loop, ``benchmarks/seed_reference.py``). Steps of all variants are interleaved and
each is reported as the median over repeats, with its ratio to ``plain``.

    python -m benchmarks.carrot_step [--quick] [--device cpu|cuda] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._report import median_time, write_report
from benchmarks.seed_reference import SeedCarrotFeatureAug, seed_train_step
from pipeline.carrot import CarrotAugment, CarrotConfig, carrot_loss

DEFAULT_JSON = Path(__file__).parent / "results" / "carrot_step.json"
# Targets: CARROT step time over the plain step.
TARGETS = {"carrot_class": 2.5, "carrot_sample": 8.0}


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
                out = aug(z, y, logits.detach(), lin.weight, generator=gen)
                loss = carrot_loss(lin.weight, z, y, out, 1.0, logits=logits)
                diag = out.diagnostics
            loss.backward()
            opt.step()
            return diag

        return step

    return {name: make(name) for name in ("plain", "carrot_class", "carrot_sample", "seed_loop")}


def run(quick: bool = False, device: str = "cpu", *, sizes: dict[str, int] | None = None) -> dict:
    """Measure every variant; returns ``{"rows": [...], "sizes": {...}, "device", "quick"}``.

    ``sizes`` (keys B, D, C, K) overrides the default problem for ``device``.
    """
    sizes = sizes or _sizes(device)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(quick=args.quick, device=args.device)
    sizes = result["sizes"]
    name = "carrot_step B={B} D={D} C={C} K={K} on {device}".format(**sizes, device=args.device)
    write_report(
        name, result["rows"], json_path=args.json, extra={"sizes": sizes, "quick": args.quick}
    )


if __name__ == "__main__":
    main()
