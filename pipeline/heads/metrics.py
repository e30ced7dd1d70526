"""Classification metrics on top of ``sklearn.metrics``. Inputs are NumPy arrays or tensors;
every fraction is in [0, 1].

Conventions are scikit-learn's: mean per-class accuracy is the mean recall over the classes that
occur in ``y_true`` (``balanced_accuracy_score``); top-k breaks score ties like
``top_k_accuracy_score``; the confusion matrix has true classes on rows. What is added here: an
empty input scores 0.0, class ``c`` is column ``c`` of a score matrix (so classes absent from
``y_true`` need no ``labels=``), ``k`` is clipped to C, and a 2-class score matrix is ranked like
any other (scikit-learn's binary branch wants 1-D scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def accuracy(y_true: Any, pred: Any) -> float:
    """Top-1 accuracy from hard predictions ``(N,)``."""
    y, p = _np(y_true), _np(pred)
    return float(skm.accuracy_score(y, p)) if len(y) else 0.0


def top_k_accuracy(y_true: Any, scores: Any, k: int = 5) -> float:
    """Fraction of rows whose true class is among the k highest ``scores (N, C)``.

    ``k`` is clipped to C (so top-5 of a 3-class problem is 1.0).
    """
    y, s = _np(y_true), _np(scores)
    if not len(y):
        return 0.0
    C = s.shape[1]
    k = max(1, min(int(k), C))
    if k >= C:  # every class is in the top k (scikit-learn would warn that the score is trivial)
        return 1.0
    if C == 2:  # k == 1; scikit-learn's binary branch thresholds 1-D scores instead of ranking
        last_max = C - 1 - np.argmax(s[:, ::-1], axis=1)  # its tie rule: the highest index wins
        return accuracy(y, last_max)
    return float(skm.top_k_accuracy_score(y, s, k=k, labels=np.arange(C)))


def per_class_accuracy(y_true: Any, pred: Any, *, num_classes: int | None = None) -> np.ndarray:
    """Recall per class ``(C,) float64``; NaN for classes absent from ``y_true``."""
    y, p = _np(y_true).astype(np.int64), _np(pred).astype(np.int64)
    C = int(
        num_classes if num_classes is not None else max(y.max(initial=-1), p.max(initial=-1)) + 1
    )
    if not len(y):
        return np.full(C, np.nan)
    recall = skm.recall_score(y, p, labels=np.arange(C), average=None, zero_division=np.nan)
    return np.asarray(recall, dtype=np.float64)


def mean_per_class_accuracy(y_true: Any, pred: Any) -> float:
    """Mean recall over the classes present in ``y_true`` (= balanced accuracy).

    ``recall_score`` over those classes is ``balanced_accuracy_score`` without its warning for
    predicted classes that ``y_true`` lacks (common in few-shot evaluation).
    """
    y, p = _np(y_true), _np(pred)
    if not len(y):
        return 0.0
    return float(skm.recall_score(y, p, labels=np.unique(y), average="macro"))


def confusion_matrix(y_true: Any, pred: Any, *, num_classes: int) -> np.ndarray:
    """Counts ``(C, C) int64``: row = true class, column = predicted class."""
    y, p = _np(y_true).astype(np.int64), _np(pred).astype(np.int64)
    if not len(y):
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    # at least 2 labels: scikit-learn warns about any 1 x 1 matrix, even one asked for
    cm = skm.confusion_matrix(y, p, labels=np.arange(max(num_classes, 2)))
    return cm[:num_classes, :num_classes].astype(np.int64, copy=False)


def nll(y_true: Any, probs: Any, *, eps: float | None = None) -> float:
    """Mean negative log-likelihood ``-log p(y)`` (nats) of probabilities ``(N, C)``, clipped to
    ``[eps, 1 - eps]`` (``eps`` defaults to the dtype's machine epsilon, as in ``log_loss``)."""
    y, P = _np(y_true).astype(np.int64), _np(probs)
    if not len(y):
        return 0.0
    if not np.issubdtype(P.dtype, np.floating):
        P = P.astype(np.float64)
    lo = 0.0 if eps is None else float(eps)  # log_loss itself clips at the machine epsilon
    P = np.clip(P, lo, 1.0 - lo)  # also rounding just past 1, which log_loss refuses
    if P.shape[1] == 1:  # log_loss needs two classes: add one that never occurs
        P = np.concatenate([P, np.zeros_like(P)], axis=1)
    return float(skm.log_loss(y, P, labels=np.arange(P.shape[1])))


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
