"""Few-shot probing: k training rows per class, head selection inside those k shots only.

The rule (no sample outside the k shots is ever used for training or selection; the given
``val`` split and the other training rows are ignored; ``test`` is used once, for the chosen head):

* ``k >= 5`` — hold-out: per class ``ceil(k / 5)`` of the shots (chosen with the seed) are the
  validation rows, the rest train. One bank run.
* ``2 <= k < 5`` — leave-one-shot-out cross-validation: k folds; fold f validates on the f-th
  shot of every class and trains on the other k-1. Heads are ranked by their mean validation
  balanced accuracy over the folds (ties: mean validation loss).
* ``k == 1`` — no row can be held out without emptying a class: heads are ranked on the
  shots themselves (resubstitution) — a weak signal, logged as a warning.

The grid is searched by `pipeline.heads.search.search_grid` over those folds (plain heads by
L-BFGS, augmented heads near the best plain λ). The chosen spec is then refitted on all k shots
by exactly the procedure that scored it (`fit_bank` with the same `TrainConfig`: to convergence,
no epoch count carried over), and evaluated on test. Several seeds draw different shots; results
are reported per seed and as mean ± std, and the head chosen most often is the summary's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.denormals import flush_denormals
from pipeline.errors import InputError
from pipeline.heads.bank import Head, HeadGrid, HeadSpec
from pipeline.heads.features import FeatureSet, Split
from pipeline.heads.metrics import classification_metrics
from pipeline.heads.search import bank_step_work, search_grid
from pipeline.heads.train import TrainConfig, fit_bank
from pipeline.threads import thread_policy

logger = logging.getLogger(__name__)

HOLDOUT_MIN_SHOTS = 5  # from this many shots on, hold out ceil(k/5) per class


def sample_shots(y: np.ndarray, shots: int, *, seed: int) -> np.ndarray:
    """Indices of ``shots`` rows per class of ``y (N,)``, drawn with ``seed``; sorted by class,
    then by draw order. Every class present in ``y`` must have at least ``shots`` rows."""
    if shots < 1:
        raise InputError(f"--shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    short = classes[counts < shots]
    if len(short):
        raise InputError(
            f"{len(short)} classes have fewer than {shots} training rows (e.g. class "
            f"{int(short[0])} has {int(counts[classes == short[0]][0])}); lower --shots"
        )
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), shots, replace=False) for c in classes]
    )


def validation_folds(
    y: np.ndarray, shots: int, *, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, val)`` index pairs into the shot set ``y (k·C,)`` following the module's rule."""
    rng = np.random.default_rng(seed + 1)
    per_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    if shots >= HOLDOUT_MIN_SHOTS:
        n_val = math.ceil(shots / 5)
        val = np.sort(np.concatenate([idx[:n_val] for idx in per_class]))
        train = np.sort(np.concatenate([idx[n_val:] for idx in per_class]))
        return [(train, val)]
    if shots >= 2:
        folds = []
        for f in range(shots):
            val = np.sort(np.array([idx[f] for idx in per_class]))
            train = np.sort(np.concatenate([np.delete(idx, f) for idx in per_class]))
            folds.append((train, val))
        return folds
    everything = np.arange(len(y))
    return [(everything, everything)]


@dataclass
class FewShotRun:
    """One seed: the shots drawn, selection scores per head, the chosen head and its test metrics."""

    seed: int
    shot_indices: np.ndarray  # rows of the original train split
    specs: tuple[HeadSpec, ...]  # the heads searched (see grid_search)
    selection: list[dict[str, Any]]  # per head: mean val balanced accuracy / loss over folds
    best_index: int
    best_spec: HeadSpec
    refit: dict[str, Any]  # the final refit's solver, converged, steps, objective
    head: Head
    test: dict[str, float] | None


@dataclass
class FewShotResult:
    """All seeds, plus mean and std (over seeds) of each test metric."""

    shots: int
    runs: list[FewShotRun]
    mean: dict[str, float]
    std: dict[str, float]

    def best_spec(self) -> HeadSpec:
        """The spec chosen by the most seeds (ties: the earliest seed's)."""
        chosen = [r.best_spec for r in self.runs]
        return max(chosen, key=lambda s: (chosen.count(s), -chosen.index(s)))

    def summary(self) -> dict[str, Any]:
        return {
            "shots": self.shots,
            "mean": self.mean,
            "std": self.std,
            "best_spec": self.best_spec().to_dict(),
            "runs": [
                {
                    "seed": r.seed,
                    "best_spec": r.best_spec.to_dict(),
                    "refit": r.refit,
                    "selection": r.selection[r.best_index],
                    "test": r.test,
                }
                for r in self.runs
            ],
        }


def _split(s: Split, idx: np.ndarray) -> Split:
    import torch

    t = torch.as_tensor(idx, dtype=torch.int64, device=s.X.device)
    ids = tuple(s.ids[i] for i in idx) if s.ids else None
    return Split(X=s.X[t], y=s.y[t], ids=ids)


def run_fewshot_seed(
    features: FeatureSet, grid: HeadGrid, cfg: TrainConfig, *, shots: int, seed: int
) -> FewShotRun:
    """Draw k shots with ``seed``, select a head inside them, refit it on all shots, test it."""
    train = features.get("train")
    shot_idx = sample_shots(train.y.cpu().numpy(), shots, seed=seed)
    shot_set = _split(train, shot_idx)  # the only training rows used from here on
    folds = validation_folds(shot_set.y.cpu().numpy(), shots, seed=seed)
    if shots == 1:
        logger.warning("1 shot per class: heads are selected on the training shots themselves")
    fold_sets = [
        FeatureSet(
            splits={"train": _split(shot_set, tr), "val": _split(shot_set, va)},
            class_names=features.class_names,
            device=features.device,
        )
        for tr, va in folds
    ]
    search = search_grid(fold_sets, grid.specs, cfg)
    best = search.best()
    spec = search.specs[best]
    full = FeatureSet(
        splits={"train": shot_set}, class_names=features.class_names, device=features.device
    )
    refit = fit_bank(full, [spec], cfg, val_split=None)  # the procedure that was scored
    head = refit.bank.head(0)
    test = None
    if features.has("test"):
        from pipeline.heads.predict import predict

        te = features.get("test")
        _, probs = predict(head, te.X, batch_size=cfg.eval_batch_size)
        test = classification_metrics(te.y.cpu().numpy(), probs)
    logger.info("%d-shot seed %d: chose %s, test %s", shots, seed, spec.name, test)
    return FewShotRun(
        seed, shot_idx, search.specs, search.scores, best, spec, refit.status[0], head, test
    )


def run_fewshot(
    features: FeatureSet,
    grid: HeadGrid | Sequence[HeadSpec],
    cfg: TrainConfig | None = None,
    *,
    shots: int,
    seeds: Sequence[int] = (0,),
    threads: int | None = None,
) -> FewShotResult:
    """`run_fewshot_seed` for every seed; mean and std (population, ddof=0) of test metrics.

    ``threads``: torch CPU threads for all of it; None: `pipeline.threads`' policy for a bank
    over the ``shots × classes`` shot rows. Torch's thread count is restored afterwards."""
    cfg = cfg if cfg is not None else TrainConfig()
    grid = grid if isinstance(grid, HeadGrid) else HeadGrid(tuple(grid))
    work = math.nan
    if features.splits and shots >= 1:
        rows = shots * features.num_classes
        work = bank_step_work(
            grid.specs, cfg, rows=rows, dim=features.dim, classes=features.num_classes
        )
    with thread_policy(work, threads, device=cfg.device) as n, flush_denormals():
        logger.info("few-shot on %d torch thread(s): %.3g multiply-adds per step", n, work)
        return _run_fewshot(features, grid, cfg, shots=shots, seeds=seeds)


def _run_fewshot(
    features: FeatureSet,
    grid: HeadGrid,
    cfg: TrainConfig,
    *,
    shots: int,
    seeds: Sequence[int],
) -> FewShotResult:
    """`run_fewshot` with the thread count already set (and its arguments resolved)."""
    if not seeds:
        raise InputError("give at least one few-shot seed")
    runs = [run_fewshot_seed(features, grid, cfg, shots=shots, seed=s) for s in seeds]
    keys = [k for k in (runs[0].test or {}) if k != "n"]
    mean = {k: float(np.mean([r.test[k] for r in runs if r.test])) for k in keys}
    std = {k: float(np.std([r.test[k] for r in runs if r.test])) for k in keys}
    return FewShotResult(shots=shots, runs=runs, mean=mean, std=std)
