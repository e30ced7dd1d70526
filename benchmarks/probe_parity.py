"""Probe parity: ``carrot train``'s defaults against scikit-learn's best-C logistic regression.

For each data set, on the same train/val/test rows and in the same run:

* **ours** — `pipeline.heads.probe.run_probe` with `ProbeSettings()` (exactly what ``carrot train
  STORE`` runs inside its flow: the default grid, plain and CARROT heads, validation selection);
* **LR** — the project's one baseline (`pipeline.heads.baseline`): ``StandardScaler`` then
  ``LogisticRegression`` (lbfgs), C swept over the same regularization grid (``C = 1/(λN)``,
  warm-started), chosen on the validation split;
* **LR (LN)** — the same on LayerNorm'd rows, i.e. the heads' own model class (for reference);
* **plain** — ours with ``--aug none`` (the L-BFGS heads alone): the CARROT heads of the default
  bank train by minibatch and cost most of the default's time; ``default/plain`` is their ratio
  (target ≤ 2).

Reported: test top-1 of each, ours − LR in points (target ≥ −0.5), and wall times (target: ours
≤ LR's sweep; the ratio is printed). Both run single-threaded (one torch thread, one BLAS
thread), so neither gains from the other's idle core, and both after one untimed warm-up fit
(one-time imports and allocations).

    python -m benchmarks.probe_parity [--quick] [--store URL ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._report import write_report
from pipeline.heads.baseline import BaselineConfig, fit_logistic_baseline
from pipeline.heads.features import FeatureSet
from pipeline.heads.probe import ProbeSettings, run_probe
from pipeline.threads import torch_threads

DEFAULT_JSON = Path(__file__).parent / "results" / "probe_parity.json"
TARGET_POINTS = -0.5
TARGET_BANK_RATIO = 2.0  # the default `none,carrot` bank over the `none` bank of the same grid
DIGITS_BACKBONES = ("resnet18", "convnext_atto", "vit_tiny_patch16_224")  # random init, 224 px
QUICK_BACKBONES = ()


def digits_pixels() -> FeatureSet:
    """scikit-learn's digits as 64 raw pixels: train/val/test 70/10/20 % of a seeded shuffle."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    p = np.random.default_rng(0).permutation(len(y))
    X, y = X[p].astype(np.float32), y[p]
    a, b = int(0.7 * len(y)), int(0.8 * len(y))
    return FeatureSet.from_arrays(
        {"train": (X[:a], y[:a]), "val": (X[a:b], y[a:b]), "test": (X[b:], y[b:])}
    )


def _synthetic(name: str) -> FeatureSet:
    from pipeline.evaluation.suite import SYNTHETIC
    from pipeline.evaluation.synthetic import make_synthetic

    d = make_synthetic(SYNTHETIC[name])
    return FeatureSet.from_arrays(
        {split: d.select(split) for split in ("train", "test")}, class_names=d.class_names
    )


def _digits_store(backbone: str, image_size: int | None) -> Callable[[], FeatureSet]:
    def load() -> FeatureSet:
        from pipeline.embed.backbone import BackboneConfig
        from pipeline.embed.extract import ExtractConfig
        from pipeline.embed.run import EmbedSettings, run_embedding
        from stores import open_store

        summary = run_embedding(
            EmbedSettings(
                data="sklearn:digits",
                backbone=BackboneConfig(name=backbone, image_size=image_size),
                extract=ExtractConfig(batch_size=64),
            )
        )
        return FeatureSet.from_store(open_store(summary.store))

    return load


def _user_store(url: str) -> Callable[[], FeatureSet]:
    def load() -> FeatureSet:
        from stores import open_store

        return FeatureSet.from_store(open_store(url))

    return load


def datasets(quick: bool, stores: tuple[str, ...]) -> dict[str, Callable[[], FeatureSet]]:
    """Name → loader of every data set the benchmark runs."""
    out: dict[str, Callable[[], FeatureSet]] = {}
    for backbone in QUICK_BACKBONES if quick else DIGITS_BACKBONES:
        out[f"digits/{backbone} 224px"] = _digits_store(backbone, 224)
    out["digits/test_vit"] = _digits_store("test_vit", None)
    out["digits pixels"] = digits_pixels
    out["synthetic-nuisance"] = lambda: _synthetic("synthetic-nuisance")
    if not quick:
        out["synthetic-clean"] = lambda: _synthetic("synthetic-clean")
    for url in stores:
        out[url] = _user_store(url)
    return out


def _warmup_set() -> FeatureSet:
    rng = np.random.default_rng(0)
    y = np.arange(120) % 4
    X = (rng.standard_normal((4, 8))[y] + rng.standard_normal((120, 8))).astype(np.float32)
    return FeatureSet.from_arrays({"train": (X[:80], y[:80]), "test": (X[80:], y[80:])})


def measure(features: FeatureSet) -> dict[str, Any]:
    """Ours (defaults) and both baselines on one feature set: top-1, seconds, choices."""
    t0 = time.perf_counter()
    ours = run_probe(features, ProbeSettings())
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = run_probe(features, ProbeSettings(augs=("none",)))
    plain_s = time.perf_counter() - t0
    lr = fit_logistic_baseline(features, BaselineConfig())
    lr_ln = fit_logistic_baseline(features, BaselineConfig(preprocess="layernorm"))
    s = ours.summary
    return {
        "ours_top1": s["top1"],
        "lr_top1": lr.test["top1"],
        "lr_ln_top1": lr_ln.test["top1"],
        "points": 100 * (s["top1"] - lr.test["top1"]),
        "ours_s": ours_s,
        "plain_top1": plain.summary["top1"],
        "plain_s": plain_s,
        "plain_time_ratio": plain_s / lr.seconds,
        "lr_s": lr.seconds,
        "time_ratio": ours_s / lr.seconds,
        "bank_ratio": ours_s / plain_s,
        "best_head": f"{s['best_head']['aug']} λ={s['best_head']['weight_decay']:g}",
        "heads": f"{s['converged']}/{s['heads_trained']} converged",
        "lr_C": lr.best_C,
    }


def run(
    quick: bool = False,
    *,
    stores: tuple[str, ...] = (),
    json_path: str | Path | None = DEFAULT_JSON,
) -> dict[str, Any]:
    """Measure every data set; print the table and write JSON. Returns rows and raw numbers."""
    rows, raw = [], {}
    with torch_threads(1):
        measure(_warmup_set())  # one-time imports and first-call costs of both sides, untimed
        for name, load in datasets(quick, stores).items():
            m = measure(load())
            raw[name] = m
            rows.append(
                {
                    "data": name,
                    "ours %": 100 * m["ours_top1"],
                    "LR %": 100 * m["lr_top1"],
                    "Δ points": m["points"],
                    "LR(LN) %": 100 * m["lr_ln_top1"],
                    "ours s": m["ours_s"],
                    "LR s": m["lr_s"],
                    "time ratio": m["time_ratio"],
                    "plain %": 100 * m["plain_top1"],
                    "plain s": m["plain_s"],
                    "plain ratio": m["plain_time_ratio"],
                    "default/plain": m["bank_ratio"],
                    "best head": m["best_head"],
                    "heads": m["heads"],
                    "met": m["points"] >= TARGET_POINTS and m["time_ratio"] <= 1.0,
                }
            )
    extra = {
        "targets": {
            "points": f">= {TARGET_POINTS}",
            "time_ratio": "<= 1",
            "bank_ratio": f"<= {TARGET_BANK_RATIO}",
        },
        "datasets": raw,
        "quick": quick,
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    write_report("probe_parity", rows, json_path=json_path, extra=extra)
    return {"rows": rows, **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="test_vit, pixels and one synthetic set")
    ap.add_argument("--store", action="append", default=[], help="also this store (repeatable)")
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the JSON report")
    args = ap.parse_args(argv)
    run(args.quick, stores=tuple(args.store), json_path=args.json)


if __name__ == "__main__":
    main()
