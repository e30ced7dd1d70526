"""Metrics against references by hand, the logistic-regression baseline, plots."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn import metrics as skm
from sklearn.datasets import load_digits

from pipeline.errors import InputError
from pipeline.heads import metrics as M
from pipeline.heads.baseline import BaselineConfig, fit_logistic_baseline, layernorm_rows
from pipeline.heads.features import FeatureSet
from pipeline.plots import plot_confusion, plot_learning_curves


@st.composite
def scored_labels(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 8))
    y = draw(arrays(np.int64, n, elements=st.integers(0, c - 1)))
    # small integer scores make ties common: the tie rule must hold
    scores = draw(arrays(np.float64, (n, c), elements=st.integers(-3, 3).map(float)))
    return y, scores, c


# References by hand (loops over rows and classes), independent of scikit-learn and NumPy sorts.


def _top_k_by_hand(y, scores, k):
    """A row is a hit when fewer than k classes outrank its true class; among equal scores the
    higher class index ranks first (scikit-learn's rule)."""
    hits = 0
    for row, t in zip(scores.tolist(), y.tolist(), strict=True):
        above = sum(1 for j, v in enumerate(row) if v > row[t] or (v == row[t] and j > t))
        hits += above < k
    return hits / len(y)


def _recall_by_hand(y, pred, c):
    out = []
    for cls in range(c):
        rows = [p for t, p in zip(y.tolist(), pred.tolist(), strict=True) if t == cls]
        out.append(sum(p == cls for p in rows) / len(rows) if rows else float("nan"))
    return out


def _confusion_by_hand(y, pred, c):
    cm = [[0] * c for _ in range(c)]
    for t, p in zip(y.tolist(), pred.tolist(), strict=True):
        cm[t][p] += 1
    return np.array(cm)


@settings(deadline=None, max_examples=80)
@given(data=scored_labels(), k=st.integers(1, 10))
def test_top_k_matches_the_rank_rule(data, k):
    y, scores, c = data
    expected = _top_k_by_hand(y, scores, min(k, c))  # k is clipped to C
    assert M.top_k_accuracy(y, scores, k) == pytest.approx(expected)
    assert 0.0 <= M.top_k_accuracy(y, scores, k) <= 1.0


def test_top_k_ties_edges_and_two_classes():
    y = np.array([1, 0, 1, 0])
    two = np.array([[1.0, 1.0], [0.2, 0.8], [0.3, 0.3], [0.9, 0.1]])  # ties: class 1 wins
    assert M.top_k_accuracy(y, two, 1) == 0.75  # 0.25 if the lower index won ties
    assert M.top_k_accuracy(y, two, 2) == M.top_k_accuracy(y, two, 9) == 1.0
    assert M.top_k_accuracy(np.array([0, 0]), np.ones((2, 1)), 1) == 1.0  # one class
    assert M.top_k_accuracy(y[:0], two[:0], 1) == 0.0
    three = np.array([[2.0, 2.0, 2.0], [0.0, 1.0, 1.0]])
    assert M.top_k_accuracy(np.array([0, 1]), three, 1) == 0.0  # class 2 wins both ties
    assert M.top_k_accuracy(np.array([0, 1]), three, 2) == 0.5


@settings(deadline=None, max_examples=80)
@given(data=scored_labels())
def test_mean_per_class_top1_confusion_by_hand(data):
    y, scores, c = data
    pred = scores.argmax(1)
    recall = _recall_by_hand(y, pred, c)
    present = [r for r in recall if r == r]  # classes absent from y_true do not count
    assert M.mean_per_class_accuracy(y, pred) == pytest.approx(sum(present) / len(present))
    np.testing.assert_allclose(M.per_class_accuracy(y, pred, num_classes=c), recall)
    with warnings.catch_warnings():  # sklearn warns when y_pred has classes absent from y_true
        warnings.simplefilter("ignore")
        balanced = skm.balanced_accuracy_score(y, pred)  # the convention the docstring names
    assert M.mean_per_class_accuracy(y, pred) == pytest.approx(balanced)
    hits = sum(t == p for t, p in zip(y.tolist(), pred.tolist(), strict=True))
    assert M.accuracy(y, pred) == pytest.approx(hits / len(y))
    cm = M.confusion_matrix(y, pred, num_classes=c)
    assert cm.dtype == np.int64 and cm.shape == (c, c)
    assert np.array_equal(cm, _confusion_by_hand(y, pred, c))


def test_metrics_with_absent_classes_and_empty_inputs():
    y, pred = np.array([0, 0, 2]), np.array([0, 1, 1])  # class 1 never true, 3 never seen
    per = M.per_class_accuracy(y, pred, num_classes=4)
    assert per.shape == (4,) and per[0] == 0.5 and per[2] == 0.0
    assert np.isnan(per[1]) and np.isnan(per[3])
    assert M.per_class_accuracy(y, pred).shape == (3,)  # C from the largest label seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning for predicted-only classes
        assert M.mean_per_class_accuracy(y, pred) == pytest.approx(0.25)
        assert np.array_equal(
            M.confusion_matrix(y, pred, num_classes=4),
            [[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
        )
        assert np.array_equal(M.confusion_matrix([0, 0], [0, 0], num_classes=1), [[2]])
    empty = np.zeros(0, dtype=np.int64)
    assert M.accuracy(empty, empty) == M.mean_per_class_accuracy(empty, empty) == 0.0
    assert np.array_equal(M.confusion_matrix(empty, empty, num_classes=3), np.zeros((3, 3)))
    assert M.confusion_matrix(empty, empty, num_classes=3).dtype == np.int64
    assert np.isnan(M.per_class_accuracy(empty, empty, num_classes=2)).all()
    assert M.nll(empty, np.zeros((0, 3))) == 0.0


def _nll_by_hand(y, probs, eps):
    return -sum(
        math.log(min(max(float(probs[i, t]), eps), 1.0 - eps)) for i, t in enumerate(y.tolist())
    ) / len(y)


@settings(deadline=None, max_examples=50)
@given(
    n=st.integers(1, 30),
    c=st.integers(2, 6),
    seed=st.integers(0, 10_000),
)
def test_nll_by_hand(n, c, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, c)) * 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = rng.integers(0, c, n)
    expected = _nll_by_hand(y, probs, float(np.finfo(np.float64).eps))
    assert M.nll(y, probs) == pytest.approx(expected, rel=1e-9)


def test_nll_clips_probabilities():
    y = np.array([1, 0])
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])  # a certain miss: -log(eps), not inf
    eps64 = float(np.finfo(np.float64).eps)
    assert M.nll(y, probs) == pytest.approx(-(math.log(eps64) + math.log(1 - eps64)) / 2)
    eps32 = float(np.finfo(np.float32).eps)  # float32 probabilities: float32's epsilon
    assert M.nll(y, probs.astype(np.float32)) == pytest.approx(-math.log(eps32) / 2, rel=1e-6)
    assert M.nll(y, probs, eps=1e-3) == pytest.approx(-(math.log(1e-3) + math.log(1 - 1e-3)) / 2)
    assert M.nll(np.array([0, 0]), np.ones((2, 1))) == pytest.approx(-math.log(1 - eps64))


def test_classification_metrics_accepts_tensors_and_clips_k():
    y = torch.tensor([0, 1, 2, 2])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    m = M.classification_metrics(y, probs)
    assert m["top1"] == 0.75 and m["top5"] == 1.0  # k clipped to C = 3
    assert m["mean_per_class"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["n"] == 4 and m["nll"] == pytest.approx(
        -(math.log(0.8) + math.log(0.7) + math.log(0.2) + math.log(0.8)) / 4, rel=1e-6
    )
    assert M.classification_metrics(y, probs, k=2)["top2"] == 0.75  # row 2: class 2 is third


def _digits(seed=0):
    X, y = load_digits(return_X_y=True)
    p = np.random.default_rng(seed).permutation(len(y))
    X, y = X[p].astype(np.float32), y[p]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return FeatureSet.from_arrays(
        {"train": (X[:a], y[:a]), "val": (X[a:b], y[a:b]), "test": (X[b:], y[b:])}
    )


FAST = BaselineConfig(lambdas=(1e-4, 1e-3, 1e-2, 1e-1), max_iter=500, tol=1e-4)


@pytest.mark.parametrize("preprocess", ["layernorm", "standardize", "none"])
def test_baseline_c_search_on_digits(preprocess):
    fs = _digits()
    r = fit_logistic_baseline(fs, dataclasses.replace(FAST, preprocess=preprocess))
    assert r.test["top1"] > 0.9
    assert r.best_lambda in FAST.lambdas
    assert r.best_C == pytest.approx(1 / (r.best_lambda * fs.num_rows("train")))
    best = max(s["balanced_accuracy"] for s in r.val_scores)
    assert r.val["mean_per_class"] == pytest.approx(best)
    assert [s["lambda"] for s in r.val_scores] == sorted(FAST.lambdas, reverse=True)
    assert r.seconds > 0


def test_baseline_over_folds_chooses_on_the_fold_means_and_refits_on_the_final_rows():
    from pipeline.heads.baseline import select_logistic

    fs = _digits()
    X, y = fs.get("train").X.numpy(), fs.get("train").y.numpy()
    half = len(y) // 2
    folds = [(X[:half], y[:half], X[half:], y[half:]), (X[half:], y[half:], X[:half], y[:half])]
    r = select_logistic(folds, (X, y), None, num_classes=10, cfg=FAST)
    assert r.test is None and r.best_C == pytest.approx(1 / (r.best_lambda * len(y)))
    one = [select_logistic([f], (f[0], f[1]), None, num_classes=10, cfg=FAST) for f in folds]
    for i, s in enumerate(r.val_scores):
        mean = np.mean([o.val_scores[i]["balanced_accuracy"] for o in one])
        assert s["balanced_accuracy"] == pytest.approx(mean)


def test_baseline_chooses_on_validation_not_test():
    fs = _digits()
    clean = fit_logistic_baseline(fs, FAST)
    test = fs.splits["test"]
    poisoned = dataclasses.replace(fs, splits=dict(fs.splits))
    poisoned.splits["test"] = dataclasses.replace(test, y=(test.y + 1) % 10)
    dirty = fit_logistic_baseline(poisoned, FAST)
    assert dirty.best_C == clean.best_C and dirty.val_scores == clean.val_scores
    assert dirty.test["top1"] < 0.2


def test_layernorm_rows_is_the_heads_normalization():
    X = np.random.default_rng(0).standard_normal((5, 9)) * 3 + 2
    ref = torch.nn.functional.layer_norm(torch.as_tensor(X), (9,), eps=1e-5).numpy()
    np.testing.assert_allclose(layernorm_rows(X), ref, rtol=1e-10, atol=1e-10)


def test_bad_baseline_config_is_an_input_error():
    with pytest.raises(InputError):
        BaselineConfig(preprocess="pca")
    with pytest.raises(InputError):
        BaselineConfig(lambdas=(0.0,))


def test_plots_write_pngs(tmp_path):
    curves = {
        "train_loss": [[1.0, 2.0], [0.5, 1.5]],
        "val_balanced_accuracy": [[0.5, 0.4], [0.7, 0.6]],
    }
    p = plot_learning_curves(curves, tmp_path / "lc.png", best_index=0, labels=["a", "b"])
    cm = np.array([[3, 1], [0, 4]])
    q = plot_confusion(cm, tmp_path / "cm.png", class_names=["x", "y"])
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
