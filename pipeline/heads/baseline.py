"""The one logistic-regression baseline: scikit-learn's ``LogisticRegression``, best C on
validation, fitted the same way by ``carrot train --baseline``, the demo, ``carrot bench
quality`` and the benchmarks.

Preprocessing (``BaselineConfig.preprocess``), fitted on the training rows only:

* ``"standardize"`` (default): per-feature z-scores (``StandardScaler``) — what a scikit-learn
  user would pick;
* ``"layernorm"``: each row standardized over its D features (the heads' LayerNorm without
  affine), then per-feature z-scores — exactly the heads' model class (`pipeline.heads.precondition`);
* ``"none"``: raw features.

The C grid is the heads' weight-decay grid (``λ``) read through ``C = 1 / (λ · n)`` (``n``: the
fit's training rows), so both sweep the same regularization path. C is chosen on validation
rows only — one split, or the mean over few-shot folds (`select_logistic`) — by the highest
balanced accuracy, ties by validation NLL, then the smaller C.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.defaults import DEFAULT_WEIGHT_DECAYS, LN_EPS
from pipeline.errors import InputError
from pipeline.heads.features import FeatureSet
from pipeline.heads.metrics import classification_metrics

logger = logging.getLogger(__name__)

PREPROCESS = ("standardize", "layernorm", "none")
Fold = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # X_train, y_train, X_val, y_val


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the logistic-regression baseline."""

    lambdas: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS  # C = 1 / (λ · n) for each
    preprocess: str = "standardize"  # "standardize" | "layernorm" | "none"
    max_iter: int = 5000  # lbfgs iterations per C
    tol: float = 1e-4  # scikit-learn's default stopping tolerance
    val_fraction: float = 0.1  # class-balanced val carved from train when there is none
    seed: int = 0
    # BLAS threads during the fits; None = the library default. 1 avoids oversubscription next to
    # torch's own thread pool (measured on a busy 2-core machine: 0.07 s vs 2.5 s for 4 fits).
    blas_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS:
            raise InputError(f"preprocess must be one of {PREPROCESS}, got {self.preprocess!r}")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise InputError(f"lambdas must be positive numbers, got {self.lambdas}")


@dataclass
class BaselineResult:
    """Chosen C (for the final fit's rows), per-λ validation scores, the chosen model's
    validation/test metrics, and the seconds the C sweep took."""

    best_C: float
    best_lambda: float
    val_scores: list[dict[str, float]]  # per λ: lambda, balanced_accuracy, nll (fold means)
    val: dict[str, float]
    test: dict[str, float] | None
    seconds: float = 0.0
    test_probs: np.ndarray | None = None
    model: Any = field(default=None, repr=False)


def layernorm_rows(X: np.ndarray, *, eps: float = LN_EPS) -> np.ndarray:
    """Standardize each row over its features: ``(N, D) -> (N, D) float64``."""
    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(axis=1, keepdims=True)
    var = X.var(axis=1, keepdims=True)
    return (X - mu) / np.sqrt(var + eps)


class Preprocessor:
    """The baseline's input transform, fitted on training rows: ``(N, D) -> (N, D) float64``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.scaler: StandardScaler | None = None

    def _rows(self, X: np.ndarray) -> np.ndarray:
        return layernorm_rows(X) if self.kind == "layernorm" else np.asarray(X, dtype=np.float64)

    def fit(self, X: np.ndarray) -> Preprocessor:
        if self.kind != "none":
            self.scaler = StandardScaler().fit(self._rows(X))
        return self

    def __call__(self, X: np.ndarray) -> np.ndarray:
        Z = self._rows(X)
        return self.scaler.transform(Z) if self.scaler is not None else Z


@dataclass
class _Fitted:
    prep: Preprocessor
    model: LogisticRegression
    num_classes: int
    blas_threads: int | None

    def probs(self, X: np.ndarray) -> np.ndarray:
        P = np.zeros((X.shape[0], self.num_classes))
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            P[:, self.model.classes_] = self.model.predict_proba(self.prep(X))
        return P


def _sweep(
    X: np.ndarray, y: np.ndarray, lambdas: Sequence[float], cfg: BaselineConfig, C_total: int
) -> list[_Fitted]:
    """One fit per λ (in the given order, each warm-started from the previous one)."""
    prep = Preprocessor(cfg.preprocess).fit(X)
    Z = prep(X)
    model = LogisticRegression(max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True)
    out = []
    for lam in lambdas:
        model.set_params(C=1.0 / (lam * len(y)))
        with threadpool_limits(limits=cfg.blas_threads, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # tiny λ, separable few-shot rows
            model.fit(Z, y)
        out.append(_Fitted(prep, copy.deepcopy(model), C_total, cfg.blas_threads))
    return out


def select_logistic(
    folds: Sequence[Fold],
    final: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    *,
    num_classes: int,
    cfg: BaselineConfig | None = None,
) -> BaselineResult:
    """Choose λ (C) on ``folds`` (mean validation score), fit it on ``final`` rows, test it.

    With one fold whose training rows are ``final``'s, the fold's fit is reused (no refit).
    """
    cfg = cfg if cfg is not None else BaselineConfig()
    t0 = time.perf_counter()
    lambdas = sorted(cfg.lambdas, reverse=True)  # strong → weak regularization (warm starts)
    reuse = len(folds) == 1 and folds[0][0] is final[0]
    per_fold, first_fits = [], []
    for Xtr, ytr, Xva, yva in folds:
        fits = _sweep(Xtr, ytr, lambdas, cfg, num_classes)
        first_fits = first_fits or fits
        rows = []
        for fit in fits:
            m = classification_metrics(yva, fit.probs(Xva))
            rows.append((m["mean_per_class"], m["nll"]))
        per_fold.append(rows)
    score = np.asarray(per_fold).mean(axis=0)  # (n_lambda, 2)
    scores = [
        {"lambda": float(lam), "balanced_accuracy": float(b), "nll": float(n)}
        for lam, (b, n) in zip(lambdas, score, strict=True)
    ]
    best = min(range(len(lambdas)), key=lambda i: (-score[i, 0], score[i, 1], -lambdas[i]))
    lam = lambdas[best]
    # reuse the fold's fit, or refit along the same warm-start path on the final rows
    chosen = (
        first_fits[best] if reuse else _sweep(*final, lambdas[: best + 1], cfg, num_classes)[-1]
    )
    seconds = time.perf_counter() - t0
    logger.info("logistic baseline: λ=%g, val %s (%.1f s)", lam, scores[best], seconds)
    Xva, yva = folds[0][2], folds[0][3]
    result = BaselineResult(
        best_C=float(chosen.model.C),
        best_lambda=float(lam),
        val_scores=scores,
        val=classification_metrics(yva, chosen.probs(Xva)),
        test=None,
        seconds=seconds,
        model=chosen,
    )
    if test is not None:
        probs = chosen.probs(test[0])
        result.test = classification_metrics(test[1], probs)
        result.test_probs = probs.astype(np.float32)
    return result


def fit_logistic_baseline(
    features: FeatureSet, cfg: BaselineConfig | None = None
) -> BaselineResult:
    """The baseline on a feature set's splits: C chosen on ``val`` (carved from ``train``,
    class-balanced, when missing), the chosen model evaluated on ``test`` when there is one."""
    cfg = cfg if cfg is not None else BaselineConfig()
    features = features.with_validation(fraction=cfg.val_fraction, seed=cfg.seed)
    tr, va = features.get("train"), features.get("val")
    Xtr, ytr = tr.X.cpu().numpy(), tr.y.cpu().numpy()
    fold = (Xtr, ytr, va.X.cpu().numpy(), va.y.cpu().numpy())
    test = None
    if features.has("test"):
        te = features.get("test")
        test = (te.X.cpu().numpy(), te.y.cpu().numpy())
    return select_logistic([fold], (Xtr, ytr), test, num_classes=features.num_classes, cfg=cfg)
