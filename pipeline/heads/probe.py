"""Stage 2 as a library: a linear-probe experiment over cached features.

Builds the head grid from user-level options (augmentations × lr × weight decay), trains it as one
bank (or in few-shot mode over several seeds), optionally fits the logistic-regression baseline,
and returns a JSON-ready report. ``flows.train`` runs it as a Prefect flow.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.augment.carrot import CarrotConfig
from pipeline.augment.registry import augmentation_names, default_settings
from pipeline.defaults import DEFAULT_AUGS, DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS
from pipeline.errors import InputError
from pipeline.heads.bank import HeadGrid, HeadSpec
from pipeline.heads.baseline import BaselineConfig, fit_logistic_baseline
from pipeline.heads.features import FeatureSet
from pipeline.heads.fewshot import FewShotResult, run_fewshot
from pipeline.heads.search import TrainResult, train_head_bank
from pipeline.heads.train import TrainConfig
from pipeline.threads import check_threads


@dataclass(frozen=True)
class ProbeSettings:
    """One probe experiment (everything the ``carrot train`` options resolve into)."""

    augs: tuple[str, ...] = DEFAULT_AUGS  # augmentations in the bank; val picks the best
    carrot: CarrotConfig = field(default_factory=CarrotConfig)  # settings of "carrot" heads
    lrs: tuple[float, ...] = DEFAULT_LRS  # learning rates of minibatch heads
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS  # λ grid (L2 of the objective)
    train: TrainConfig = field(default_factory=TrainConfig)  # the training loop
    shots: int | None = None  # k shots per class (few-shot mode); None = all training data
    seeds: tuple[int, ...] = (0,)  # few-shot seeds (mean ± std over them)
    baseline: bool = False  # also fit scikit-learn's logistic regression (C searched on val)
    threads: int | None = None  # torch CPU threads for training; None: by size (pipeline.threads)

    def __post_init__(self) -> None:
        for option, values, ok, rule in (
            ("--lrs", self.lrs, lambda v: v > 0, "positive"),
            ("--wds", self.weight_decays, lambda v: v >= 0, "non-negative"),
        ):
            bad = [v for v in values if not (math.isfinite(v) and ok(v))]
            if bad or not values:
                raise InputError(f"{option} {list(bad or values)}: give {rule}, finite numbers")
        known = augmentation_names()
        for name in self.augs:
            if name not in known:
                raise InputError(f"--aug {name}: unknown augmentation; choose from {known}")
        if not self.augs:
            raise InputError("--aug: give at least one augmentation")
        if self.shots is not None and self.shots < 1:
            raise InputError(f"--shots {self.shots}: must be ≥ 1")
        check_threads(self.threads, option="--threads")


def build_grid(settings: ProbeSettings, *, plain_by_lbfgs: bool = True) -> HeadGrid:
    """Heads: every augmentation × lr × weight decay (CARROT heads carry ``settings.carrot``).

    With ``plain_by_lbfgs`` (the train split in memory, solver not "minibatch") the plain heads
    take one lr: L-BFGS does not use it, so more would be copies of one head."""
    specs: list[HeadSpec] = []
    for aug in settings.augs:
        lrs = settings.lrs[:1] if aug == "none" and plain_by_lbfgs else settings.lrs
        st = settings.carrot if aug == "carrot" else default_settings(aug)
        specs += HeadGrid.from_lists(
            lrs=lrs, weight_decays=settings.weight_decays, augmentations=[(aug, st)]
        ).specs
    return HeadGrid(tuple(specs))


@dataclass
class ProbeReport:
    """What a probe produced: the bank result (full data) or few-shot result, and a summary."""

    summary: dict[str, Any]  # JSON-ready: top1, top5, mean_per_class, best_head, ...
    result: TrainResult | None = None  # full-data mode
    fewshot: FewShotResult | None = None  # few-shot mode


def run_probe(features: FeatureSet, settings: ProbeSettings) -> ProbeReport:
    """Train the grid over ``features`` and evaluate the validation-selected head on test."""
    t0 = time.perf_counter()
    by_lbfgs = settings.train.solver != "minibatch" and "train" not in features.streams
    grid = build_grid(settings, plain_by_lbfgs=by_lbfgs)
    summary: dict[str, Any] = {"heads": len(grid), "augs": list(settings.augs)}
    report = ProbeReport(summary=summary)
    if settings.shots is None:
        result = train_head_bank(features, grid, settings.train, threads=settings.threads)
        report.result = result
        test = result.test or {}
        summary.update(_test_fields(test))
        summary["best_head"] = result.best_spec.to_dict()
        summary["val"] = result.val[result.best_index]
        summary["heads_trained"] = len(result.specs)
        summary["converged"] = sum(bool(v["converged"]) for v in result.val)
        summary["carrot_diagnostics"] = _last_diagnostics(result)
    else:
        few = run_fewshot(
            features,
            grid,
            settings.train,
            shots=settings.shots,
            seeds=settings.seeds,
            threads=settings.threads,
        )
        report.fewshot = few
        summary.update(_test_fields(few.mean))
        summary["std"] = {k: few.std[k] for k in few.std}
        summary["shots"], summary["seeds"] = settings.shots, list(settings.seeds)
        summary["best_head"] = few.best_spec().to_dict()
        summary["runs"] = few.summary()["runs"]
    if settings.baseline:
        base = fit_logistic_baseline(
            features,
            BaselineConfig(
                lambdas=tuple(w for w in settings.weight_decays if w > 0) or DEFAULT_WEIGHT_DECAYS,
                val_fraction=settings.train.val_fraction,
                seed=settings.train.seed,
            ),
        )
        summary["baseline"] = {
            "C": base.best_C,
            "seconds": round(base.seconds, 2),
            **_test_fields(base.test or {}),
        }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _test_fields(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {k: _float(metrics.get(k)) for k in ("top1", "top5", "mean_per_class")}


def _float(v: Any) -> float | None:
    return None if v is None else float(v)


def _last_diagnostics(result: TrainResult) -> dict[str, float]:
    """CARROT diagnostics of the best head in the last epoch it logged any."""
    for epoch in reversed(result.diagnostics):
        diag = epoch.get(result.best_index)
        if diag:
            return {k: float(v) for k, v in diag.items() if np.isfinite(v)}
    return {}


def settings_dict(settings: ProbeSettings) -> dict[str, Any]:
    """JSON-ready form of the settings (for config.json / artifacts)."""
    return dataclasses.asdict(settings)


def parse_names(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"none,carrot"`` → ``("none", "carrot")``."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in parts if p.strip())
