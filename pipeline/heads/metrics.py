"""Classification metrics. Inputs are NumPy arrays or tensors; every fraction is in [0, 1].

Conventions match scikit-learn: mean per-class accuracy is the mean recall over the classes that
occur in ``y_true`` (``balanced_accuracy_score``); top-k breaks score ties like
``top_k_accuracy_score``; the confusion matrix has true classes on rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def accuracy(y_true: Any, pred: Any) -> float:
    """Top-1 accuracy from hard predictions ``(N,)``."""
    y, p = _np(y_true), _np(pred)
    return float((y == p).mean()) if len(y) else 0.0


def top_k_accuracy(y_true: Any, scores: Any, k: int = 5) -> float:
    """Fraction of rows whose true class is among the k highest ``scores (N, C)``.

    ``k`` is clipped to C (so top-5 of a 3-class problem is 1.0).
    """
    y, s = _np(y_true), _np(scores)
    if not len(y):
        return 0.0
    k = max(1, min(int(k), s.shape[1]))
    # same tie rule as scikit-learn: stable ascending sort, reversed
    top = np.argsort(s, axis=1, kind="mergesort")[:, ::-1][:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def per_class_accuracy(y_true: Any, pred: Any, *, num_classes: int | None = None) -> np.ndarray:
    """Recall per class ``(C,)``; NaN for classes absent from ``y_true``."""
    y, p = _np(y_true).astype(np.int64), _np(pred).astype(np.int64)
    C = int(
        num_classes if num_classes is not None else max(y.max(initial=-1), p.max(initial=-1)) + 1
    )
    total = np.bincount(y, minlength=C).astype(np.float64)
    hits = np.bincount(y[y == p], minlength=C).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits / np.maximum(total, 1), np.nan)


def mean_per_class_accuracy(y_true: Any, pred: Any) -> float:
    """Mean recall over the classes present in ``y_true`` (= balanced accuracy)."""
    y = _np(y_true)
    if not len(y):
        return 0.0
    return float(np.nanmean(per_class_accuracy(y, pred)))


def confusion_matrix(y_true: Any, pred: Any, *, num_classes: int) -> np.ndarray:
    """Counts ``(C, C) int64``: row = true class, column = predicted class."""
    y, p = _np(y_true).astype(np.int64), _np(pred).astype(np.int64)
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def nll(y_true: Any, probs: Any, *, eps: float | None = None) -> float:
    """Mean negative log-likelihood ``-log p(y)``; probabilities clipped to ``[eps, 1 - eps]``
    (``eps`` defaults to the dtype's machine epsilon, as scikit-learn's ``log_loss``)."""
    y, P = _np(y_true).astype(np.int64), _np(probs).astype(np.float64)
    if not len(y):
        return 0.0
    eps = float(np.finfo(_np(probs).dtype).eps) if eps is None else eps
    P = np.clip(P, eps, 1.0 - eps)
    return float(-np.log(P[np.arange(len(y)), y]).mean())


def classification_metrics(y_true: Any, probs: Any, *, k: int = 5) -> dict[str, float]:
    """``top1``, ``top{k}``, ``mean_per_class`` (all in [0, 1]), ``nll`` and ``n`` for
    probabilities ``(N, C)``."""
    y, P = _np(y_true), _np(probs)
    pred = P.argmax(axis=1) if len(P) else np.zeros(0, dtype=np.int64)
    return {
        "top1": accuracy(y, pred),
        f"top{k}": top_k_accuracy(y, P, k),
        "mean_per_class": mean_per_class_accuracy(y, pred),
        "nll": nll(y, P),
        "n": len(y),
    }
