"""Baseline: scikit-learn logistic regression over the same features and splits.

Preprocessing (``BaselineConfig.preprocess``), fitted on train only:

* ``"layernorm"`` (default): each row standardized over its D features (mean 0, variance 1, eps
  1e-5) — the head's LayerNorm without affine. A multinomial logistic regression with intercept on
  these rows is exactly the head's model class (``W(γ⊙x̂ + β) = (W diag γ) x̂ + Wβ``), so the
  comparison measures optimization and regularization, not capacity.
* ``"standardize"``: per-feature z-scores (``StandardScaler``).
* ``"none"``: raw features.

``C`` (inverse L2 strength) is searched on a log grid; the winner has the highest validation
balanced accuracy, ties broken by validation NLL, then by the smaller C (stronger regularization).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline.errors import InputError
from pipeline.features import FeatureSet
from pipeline.heads import LN_EPS
from pipeline.metrics import classification_metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the logistic-regression baseline."""

    Cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-3, 4, 15))  # searched C values
    preprocess: str = "layernorm"  # "layernorm" | "standardize" | "none"
    max_iter: int = 2000  # lbfgs iterations per C
    tol: float = 1e-5
    val_fraction: float = 0.1  # class-balanced val carved from train when there is none
    seed: int = 0
    # BLAS threads during the fits; None = the library default. 1 avoids oversubscription next to
    # torch's own thread pool (measured on a busy 2-core machine: 0.07 s vs 2.5 s for 4 fits).
    blas_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.preprocess not in ("layernorm", "standardize", "none"):
            raise InputError(
                f"preprocess must be 'layernorm', 'standardize' or 'none', got {self.preprocess!r}"
            )
        if not self.Cs or min(self.Cs) <= 0:
            raise InputError(f"Cs must be a non-empty list of positive numbers, got {self.Cs}")


@dataclass
class BaselineResult:
    """Chosen C, per-C validation scores, and the chosen model's validation/test metrics."""

    best_C: float
    val_scores: list[dict[str, float]]  # per C: C, balanced_accuracy, nll
    val: dict[str, float]
    test: dict[str, float] | None
    test_probs: np.ndarray | None = None
    model: Any = field(default=None, repr=False)


def layernorm_rows(X: np.ndarray, *, eps: float = LN_EPS) -> np.ndarray:
    """Standardize each row over its features: ``(N, D) -> (N, D) float64``."""
    X = np.asarray(X, dtype=np.float64)
    mu = X.mean(axis=1, keepdims=True)
    var = X.var(axis=1, keepdims=True)
    return (X - mu) / np.sqrt(var + eps)


class _Preprocessor:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.scaler: StandardScaler | None = None

    def fit(self, X: np.ndarray) -> _Preprocessor:
        if self.kind == "standardize":
            self.scaler = StandardScaler().fit(X)
        return self

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.kind == "layernorm":
            return layernorm_rows(X)
        if self.kind == "standardize" and self.scaler is not None:
            return self.scaler.transform(np.asarray(X, dtype=np.float64))
        return np.asarray(X, dtype=np.float64)


def fit_logistic_baseline(
    features: FeatureSet, cfg: BaselineConfig | None = None
) -> BaselineResult:
    """Fit one logistic regression per C on train, choose on val, evaluate the choice on test."""
    cfg = cfg if cfg is not None else BaselineConfig()
    features = features.with_validation(fraction=cfg.val_fraction, seed=cfg.seed)
    tr, va = features.get("train"), features.get("val")
    Xtr, ytr = tr.X.cpu().numpy(), tr.y.cpu().numpy()
    Xva, yva = va.X.cpu().numpy(), va.y.cpu().numpy()
    prep = _Preprocessor(cfg.preprocess).fit(Xtr)
    Ztr, Zva = prep(Xtr), prep(Xva)
    C_total = features.num_classes

    def full_probs(model: LogisticRegression, Z: np.ndarray) -> np.ndarray:
        P = np.zeros((Z.shape[0], C_total))
        with threadpool_limits(limits=cfg.blas_threads, user_api="blas"):
            P[:, model.classes_] = model.predict_proba(Z)
        return P

    scores, models = [], []
    model = LogisticRegression(max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True)
    for C in sorted(cfg.Cs):  # small → large C, warm-started
        model.set_params(C=C)
        with threadpool_limits(limits=cfg.blas_threads, user_api="blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Ztr, ytr)
        m = classification_metrics(yva, full_probs(model, Zva))
        scores.append({"C": float(C), "balanced_accuracy": m["mean_per_class"], "nll": m["nll"]})
        models.append((C, _clone_fitted(model)))
    best = min(
        range(len(scores)),
        key=lambda i: (-scores[i]["balanced_accuracy"], scores[i]["nll"], scores[i]["C"]),
    )
    best_C, best_model = models[best]
    logger.info("logistic baseline: best C=%g, val %s", best_C, scores[best])
    val = classification_metrics(yva, full_probs(best_model, Zva))
    result = BaselineResult(
        best_C=float(best_C), val_scores=scores, val=val, test=None, model=best_model
    )
    if features.has("test"):
        te = features.get("test")
        probs = full_probs(best_model, prep(te.X.cpu().numpy()))
        result.test = classification_metrics(te.y.cpu().numpy(), probs)
        result.test_probs = probs.astype(np.float32)
    return result


def _clone_fitted(model: LogisticRegression) -> LogisticRegression:
    import copy

    return copy.deepcopy(model)
