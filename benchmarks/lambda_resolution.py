"""Is a CARROT gain a regularization-strength effect? The quality protocol on a finer λ grid.

With 10 classes and ``topk`` 10, K = min(topk, C − 1) = C − 1: every other class is a
competitor, the noise is orthogonal to every ``w_y − w_k``, and an augmented row's logits are
its plain logits plus one constant — the same cross-entropy, row for row. A CARROT head's data
term is then weighted ``1 + aug_weight``: the plain objective at ``λ / (1 + aug_weight)``, plus
zero-mean noise in W's gradient. On a half-decade λ grid that shifted optimum lies between the
plain heads' grid points, so a "gain" over the plain head can be the grid's resolution.

This runs `pipeline.evaluation.protocol.run_regime_seed` (the quality bench's regime, all data,
5 seeds) on the bench's digits store for plain, carrot-sample and gaussian twice — on the default
λ grid and on that grid with every λ/2 added — and prints each one's mean test top-1 and its
paired difference to the plain head of the default grid.

    python -m benchmarks.lambda_resolution [--seeds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import write_report
from pipeline.defaults import DEFAULT_WEIGHT_DECAYS
from pipeline.evaluation.protocol import QualityConfig, run_regime_seed
from pipeline.threads import torch_threads

DEFAULT_JSON = Path(__file__).parent / "results" / "lambda_resolution.json"
METHODS = ("plain", "carrot-sample", "gaussian")


def grids() -> dict[str, tuple[float, ...]]:
    """The default λ grid, and the same with every λ/2 added."""
    halves = {float(f"{lam / 2:.3g}") for lam in DEFAULT_WEIGHT_DECAYS}
    return {
        "default": DEFAULT_WEIGHT_DECAYS,
        "default + λ/2": tuple(sorted(set(DEFAULT_WEIGHT_DECAYS) | halves)),
    }


def run(seeds: int = 5, json_path: str | Path | None = DEFAULT_JSON) -> dict[str, Any]:
    from pipeline.evaluation.suite import DIGITS_BACKBONE, DIGITS_IMAGE_SIZE, _digits

    t0 = time.perf_counter()
    features = _digits("cpu")
    top1: dict[tuple[str, str], list[float]] = {}
    chosen: dict[tuple[str, str], list[float]] = {}
    with torch_threads(1):
        for grid_name, grid in grids().items():
            cfg = QualityConfig(methods=METHODS, shots=(None,), weight_decays=grid)
            for seed in range(seeds):
                for r in run_regime_seed(features, cfg, dataset="digits", shots=None, seed=seed):
                    top1.setdefault((grid_name, r.method), []).append(r.top1)
                    chosen.setdefault((grid_name, r.method), []).append(r.chosen["weight_decay"])
    base = np.asarray(top1[("default", "plain")])
    rows = []
    for (grid_name, method), values in top1.items():
        diff = 100 * (np.asarray(values) - base)
        rows.append(
            {
                "λ grid": grid_name,
                "method": method,
                "top-1 %": 100 * float(np.mean(values)),
                "Δ vs default-grid plain": float(diff.mean()),
                "ahead/behind": f"{int((diff > 0).sum())}/{int((diff < 0).sum())}",
                "chosen λ": ", ".join(f"{v:g}" for v in sorted(set(chosen[(grid_name, method)]))),
            }
        )
    extra = {
        "data": f"digits ({DIGITS_BACKBONE} random init, {DIGITS_IMAGE_SIZE}px), all data",
        "seeds": seeds,
        "per_seed_top1": {f"{g} / {m}": v for (g, m), v in top1.items()},
        "seconds": time.perf_counter() - t0,
    }
    write_report("lambda_resolution", rows, json_path=json_path, extra=extra)
    return {"rows": rows, **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    args = ap.parse_args(argv)
    run(args.seeds, json_path=args.json)


if __name__ == "__main__":
    main()
