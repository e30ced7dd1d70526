"""Searching the head grid over one or more selection folds, in two stages.

Plain heads (no augmentation) are cheap: one batched L-BFGS solve fits all of them. Augmented
heads cost a minibatch run each (CARROT: a geometry per step). With ``cfg.aug_near_best = k``:

1. every plain head is fitted on every fold, and the plain ``λ`` (weight decay) with the best mean
   validation score is found (the `select_best` rule);
2. the augmented heads whose ``λ`` lies within ``k`` steps of it on the plain heads' sorted ``λ``
   grid are fitted on every fold — each starting from the plain solution of its own ``λ``
   (`fit_bank`), so an augmentation is judged as a change to the plain optimum.

With ``aug_near_best = None``, or without plain heads, every head is fitted in one stage. Scores
are means over the folds; nothing outside a fold's own train and validation rows is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.denormals import flush_denormals
from pipeline.errors import InputError
from pipeline.heads.bank import Head, HeadBank, HeadGrid, HeadSpec
from pipeline.heads.features import FeatureSet
from pipeline.heads.metrics import classification_metrics
from pipeline.heads.train import FitOutput, TrainConfig, fit_bank, select_best
from pipeline.threads import step_work, thread_policy

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """The heads that were fitted (plain first), one `FitOutput` per fold with its heads in
    ``specs`` order, and per-head scores averaged over the folds."""

    specs: tuple[HeadSpec, ...]
    folds: list[FitOutput]
    scores: list[dict[str, Any]]  # balanced_accuracy, loss (fold means), converged (all folds)
    skipped: int  # augmented heads of the grid left out by the two-stage rule

    def best(self, among: Sequence[int] | None = None) -> int:
        """Index (into ``specs``) of the best head, optionally among some heads only."""
        heads = list(range(len(self.specs))) if among is None else list(among)
        augmented = [self.specs[h].aug != "none" for h in heads]
        return heads[select_best([self.scores[h] for h in heads], augmented)]


def _scores(folds: Sequence[FitOutput], n_heads: int) -> list[dict[str, Any]]:
    out = []
    for h in range(n_heads):
        vals = [f.val[h] for f in folds]
        out.append(
            {
                "balanced_accuracy": float(np.mean([v["balanced_accuracy"] for v in vals])),
                "loss": float(np.mean([v["loss"] for v in vals])),
                "rows": sum(int(v.get("rows", 0)) for v in vals),
                "converged": all(bool(v.get("converged")) for v in vals),
                "solver": vals[0].get("solver"),
            }
        )
    return out


def _pad(rows: list[list[float]], length: int, width: int) -> list[list[float]]:
    return rows + [[math.nan] * width for _ in range(length - len(rows))]


def merge_fits(first: FitOutput, second: FitOutput) -> FitOutput:
    """One `FitOutput` with ``first``'s heads, then ``second``'s (curves padded with NaN)."""
    h1, h2 = first.bank.num_heads, second.bank.num_heads
    curves = {}
    for key in set(first.curves) | set(second.curves):
        a, b = first.curves.get(key, []), second.curves.get(key, [])
        n = max(len(a), len(b))
        a, b = _pad(a, n, h1), _pad(b, n, h2)
        curves[key] = [ra + rb for ra, rb in zip(a, b, strict=True)]
    n_epochs = max(len(first.diagnostics), len(second.diagnostics))
    diagnostics = []
    for e in range(n_epochs):
        d = dict(first.diagnostics[e]) if e < len(first.diagnostics) else {}
        if e < len(second.diagnostics):
            d |= {h + h1: v for h, v in second.diagnostics[e].items()}
        diagnostics.append(d)
    return FitOutput(
        bank=HeadBank.cat([first.bank, second.bank]),
        val=first.val + second.val,
        status=first.status + second.status,
        curves=curves,
        diagnostics=diagnostics,
        epochs_run=max(first.epochs_run, second.epochs_run),
    )


def lambdas_near_best(
    plain: Sequence[HeadSpec], scores: Sequence[dict], k: int
) -> tuple[float, float]:
    """``[lo, hi]``: the ``λ`` range within ``k`` grid steps of the best plain head's ``λ``."""
    best = plain[select_best(scores)].weight_decay
    grid = sorted({s.weight_decay for s in plain})
    i = grid.index(best)
    return grid[max(0, i - k)], grid[min(len(grid) - 1, i + k)]


def search_grid(
    folds: Sequence[FeatureSet],
    specs: Sequence[HeadSpec],
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Fit ``specs`` on every fold (each a FeatureSet with ``train`` and ``val``) by the
    module's two-stage rule; fold ``f`` trains with seed ``cfg.seed + f``."""
    plain = [s for s in specs if s.aug == "none"]
    augmented = [s for s in specs if s.aug != "none"]

    def fit_all(
        chosen: Sequence[HeadSpec], solved: Sequence[FitOutput] | None = None
    ) -> list[FitOutput]:
        return [
            fit_bank(
                fold,
                chosen,
                replace(cfg, seed=cfg.seed + f),
                val_split="val",
                on_epoch=on_epoch,
                plain_solutions=None if solved is None else solved[f],
                plain_specs=plain,
            )
            for f, fold in enumerate(folds)
        ]

    if cfg.aug_near_best is None or not plain or not augmented:
        ordered = tuple(plain + augmented)
        fitted = fit_all(ordered)
        return SearchResult(ordered, fitted, _scores(fitted, len(ordered)), skipped=0)
    first = fit_all(plain)
    lo, hi = lambdas_near_best(plain, _scores(first, len(plain)), cfg.aug_near_best)
    near = [s for s in augmented if lo <= s.weight_decay <= hi]
    ordered = tuple(plain + near)
    second = fit_all(near, solved=first) if near else []  # warm starts: stage 1's solutions
    fitted = [merge_fits(a, b) for a, b in zip(first, second, strict=True)] if near else first
    return SearchResult(
        ordered, fitted, _scores(fitted, len(ordered)), skipped=len(augmented) - len(near)
    )


@dataclass
class TrainResult:
    """What `train_head_bank` returns. Per-head lists are indexed like ``specs``."""

    specs: tuple[HeadSpec, ...]
    bank: HeadBank  # every head in its final state
    val: list[dict[str, Any]]  # per head: balanced_accuracy, accuracy, loss, solver, converged...
    best_index: int
    test: dict[str, float] | None  # metrics of the best head on test (None: no test split)
    curves: dict[str, list[list[float]]]  # per L-BFGS iteration / minibatch epoch, per head
    diagnostics: list[dict[int, dict[str, float]]]  # per epoch: head -> mean CARROT diagnostics
    class_names: tuple[str, ...]
    config: TrainConfig
    test_probs: np.ndarray | None = None  # (N_test, C) float32, best head
    test_labels: np.ndarray | None = None  # (N_test,) int64
    test_ids: tuple[str, ...] | None = None
    epochs_run: int = 0  # minibatch epochs (0 when every head was solved by L-BFGS)
    skipped: int = 0  # augmented heads of the grid left out by the two-stage rule

    @property
    def best_spec(self) -> HeadSpec:
        return self.specs[self.best_index]

    def best_head(self) -> Head:
        """The chosen head as a plain `Head` module."""
        return self.bank.head(self.best_index)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for metrics.json)."""
        return {
            "best_index": self.best_index,
            "best_spec": self.best_spec.to_dict(),
            "best_val": self.val[self.best_index],
            "test": self.test,
            "epochs_run": self.epochs_run,
            "converged": sum(bool(v["converged"]) for v in self.val),
            "skipped": self.skipped,
            "heads": [
                {"spec": s.to_dict(), "val": v} for s, v in zip(self.specs, self.val, strict=True)
            ],
        }


def bank_step_work(
    specs: Sequence[HeadSpec],
    cfg: TrainConfig,
    *,
    rows: int,
    dim: int,
    classes: int,
    in_memory: bool = True,
) -> float:
    """Multiply-adds of one training step of the bank (`pipeline.threads.step_work`), for the
    thread policy: plain heads solved by L-BFGS step over all ``rows``, minibatch heads over one
    batch; a bank with both is sized by the smaller step (one thread too few costs a large step
    at most the core count; threads on a small step beside a busy process cost 2–10×). Stage 2
    of the two-stage rule fits only the augmented heads near the best plain ``λ``: counted so."""
    if not specs:
        return math.nan
    lbfgs = cfg.solver != "minibatch" and in_memory and not cfg.train_layer_norm
    plain = [s for s in specs if s.aug == "none"] if lbfgs else []
    minibatch = [s for s in specs if s.aug != "none"] if lbfgs else list(specs)
    n_minibatch = len(minibatch)
    if plain and minibatch and cfg.aug_near_best is not None:
        lambdas = len({s.weight_decay for s in minibatch})
        n_minibatch = math.ceil(n_minibatch * min(1.0, (2 * cfg.aug_near_best + 1) / lambdas))
    works = []
    if plain:
        works.append(step_work(rows, dim, len(plain), classes))
    if minibatch:
        works.append(step_work(min(cfg.batch_size, rows), dim, n_minibatch, classes))
    return min(works)


def train_head_bank(
    features: FeatureSet,
    grid: HeadGrid | Sequence[HeadSpec],
    cfg: TrainConfig | None = None,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Fit the heads of ``grid`` (two stages, see the module docstring), pick the best on
    validation, test it.

    ``features`` needs a ``train`` split; ``val`` is carved from it (class-balanced,
    ``cfg.val_fraction``) when missing; ``test`` is optional and only the chosen head sees it.
    ``threads``: torch CPU threads for all of it; None: `pipeline.threads`' policy for the
    bank's step size (`bank_step_work`). Torch's thread count is restored afterwards.
    """
    cfg = cfg if cfg is not None else TrainConfig()
    specs = tuple(grid.specs if isinstance(grid, HeadGrid) else grid)
    work = math.nan
    if features.has("train"):
        work = bank_step_work(
            specs,
            cfg,
            rows=features.num_rows("train"),
            dim=features.dim,
            classes=features.num_classes,
            in_memory="train" in features.splits,
        )
    with thread_policy(work, threads, device=cfg.device) as n, flush_denormals():
        logger.info("training on %d torch thread(s): %.3g multiply-adds per step", n, work)
        return _train_head_bank(features, specs, cfg, on_epoch=on_epoch)


def _train_head_bank(
    features: FeatureSet,
    specs: tuple[HeadSpec, ...],
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """`train_head_bank` with the thread count already set (and its arguments resolved)."""
    if not specs:
        raise InputError("the head grid is empty")
    if not features.has("train"):
        raise InputError(f"features have no 'train' split (have {features.names()})")
    features = features.with_validation(fraction=cfg.val_fraction, seed=cfg.seed)
    search = search_grid([features], specs, cfg, on_epoch=on_epoch)
    fit = search.folds[0]
    best = search.best()
    logger.info("best head %d (%s): val %s", best, search.specs[best].name, fit.val[best])
    result = TrainResult(
        specs=search.specs,
        bank=fit.bank,
        val=fit.val,
        best_index=best,
        test=None,
        curves=fit.curves,
        diagnostics=fit.diagnostics,
        class_names=features.class_names,
        config=cfg,
        epochs_run=fit.epochs_run,
        skipped=search.skipped,
    )
    if features.has("test"):
        from pipeline.heads.predict import predict

        test = features.get("test")
        _, probs = predict(result.best_head(), test.X, batch_size=cfg.eval_batch_size)
        labels = test.y.cpu().numpy()
        result.test = classification_metrics(labels, probs)
        result.test_probs, result.test_labels, result.test_ids = probs, labels, test.ids
    return result
