"""Weighted k-NN (DINOv2's eval/knn.py): against a per-row loop, on separable data, edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.knn import knn_accuracy


def _loop(train_x, train_y, test_x, test_y, k, t, c):
    """The same vote, one test row at a time, in float64."""
    bank = F.normalize(train_x.double(), dim=1)
    hits = 0
    for x, y in zip(test_x, test_y, strict=True):
        sims = bank @ F.normalize(x.double(), dim=0)
        top = sims.topk(min(k, len(sims)))
        votes = torch.zeros(c, dtype=torch.float64)
        votes.index_add_(0, train_y[top.indices], (top.values / t).exp())
        hits += int(votes.argmax() == y)
    return hits / len(test_y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_per_row_vote(seed):
    g = torch.Generator().manual_seed(seed)
    c, d = 5, 16
    means = 2 * torch.randn(c, d, generator=g)
    train_y = torch.randint(0, c, (300,), generator=g)
    test_y = torch.randint(0, c, (77,), generator=g)
    train_x = means[train_y] + torch.randn(300, d, generator=g) * 2
    test_x = means[test_y] + torch.randn(77, d, generator=g) * 2
    got = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=c, ks=(1, 10, 20), chunk=16)
    for k in (1, 10, 20):
        assert got[k] == pytest.approx(_loop(train_x, train_y, test_x, test_y, k, 0.07, c))
    assert 0.3 < got[20] < 1.0  # a noisy problem: neither chance nor perfect


def test_separable_data_and_more_neighbours_than_rows():
    x = torch.eye(4).repeat(5, 1) * 3  # 20 rows, four directions
    y = torch.arange(4).repeat(5)
    got = knn_accuracy(x, y, x[:4] + 0.01, y[:4], num_classes=4, ks=(10, 50))
    assert got == {10: 1.0, 50: 1.0}  # k = 50 > 20 rows: all of them vote, weights decide


def test_bad_inputs_are_refused():
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x, y, x, y, num_classes=2, temperature=0)
    with pytest.raises(ValueError, match="at least one"):
        knn_accuracy(x[:0], y[:0], x, y, num_classes=2)
