"""Weighted k-NN classification over frozen features, as DINOv2's ``eval/knn.py`` does it.

Features are L2-normalized; each test row's k most cosine-similar training rows vote for their
class with weight ``exp(similarity / T)`` (T = 0.07); the class with the largest vote wins.
No training, no hyper-parameters fitted on test: a second, optimizer-free view of how good a
backbone's features are, next to the linear probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20)
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy (a fraction) of the temperature-weighted k-NN vote for each k in ``ks``.

    ``train_x`` (N, D), ``train_y`` (N,) int, ``test_x`` (M, D), ``test_y`` (M,); any float dtype
    (computed in float32). k larger than N uses all N neighbours. Test rows go ``chunk`` at a
    time, so memory is O(chunk · N).
    """
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one test row")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bank = F.normalize(train_x.float(), dim=1)
    labels = train_y.long()
    k_max = min(max(ks), bank.shape[0])
    correct = {k: 0 for k in ks}
    for start in range(0, test_x.shape[0], chunk):
        q = F.normalize(test_x[start : start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k_max, dim=1)  # (m, k_max), most similar first
        weights = (sims / temperature).exp()
        votes_of = F.one_hot(labels[idx], num_classes).float() * weights[:, :, None]
        target = test_y[start : start + chunk].long()
        for k in ks:
            pred = votes_of[:, : min(k, k_max)].sum(dim=1).argmax(dim=1)
            correct[k] += int((pred == target).sum())
    return {k: correct[k] / test_x.shape[0] for k in ks}
