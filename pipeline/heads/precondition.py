"""Input preconditioning of the heads: per-dimension standardization of the normalized features.

Cached embeddings are often badly conditioned (random-init ResNet features share one large mean
vector with tiny per-dimension spread), and first- and second-order solvers alike stall on them.
Every head therefore sees ``z = γ ⊙ x̂ + β`` with ``x̂ = LN(x)`` (LayerNorm without affine) and the
LayerNorm affine set from the train split: ``γ = 1 / σ``, ``β = −μ / σ`` (μ, σ: per-dimension mean
and standard deviation of x̂ over the train rows). This is a LayerNorm affine, so a head file stays
self-contained and ``carrot predict`` needs nothing else; the post-LN space that CARROT and the
other augmentations work in is ``z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.defaults import LN_EPS
from pipeline.heads.features import FeatureSet

VAR_FLOOR = 1e-6  # variances are floored at this fraction of the mean variance (constant dims)


def _affine(total: torch.Tensor, sq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = total / n
    var = (sq / n - mean.square()).clamp_min(0.0)
    var = var + VAR_FLOOR * var.mean() + 1e-12
    gamma = var.rsqrt()
    return gamma.float(), (-mean * gamma).float()


@torch.no_grad()
def standardizing_affine(
    features: FeatureSet, split: str = "train", *, block_rows: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(γ (D,), β (D,))`` float32 on the features' device that standardize ``LN(x)`` of
    ``split``. Sums accumulate in float64; a streamed split is read once, chunk by chunk."""
    dim = features.dim
    total = torch.zeros(dim, dtype=torch.float64, device=features.device)
    sq = torch.zeros_like(total)
    n = 0
    if split in features.splits:
        X = features.get(split).X
        blocks = (X[i : i + block_rows] for i in range(0, X.shape[0], block_rows))
    else:
        blocks = (X for X, _ in features.streams[split].chunks(features.device))
    for X in blocks:
        xhat = F.layer_norm(X.float(), (dim,), eps=LN_EPS).double()
        total += xhat.sum(0)
        sq += xhat.square().sum(0)
        n += xhat.shape[0]
    if n == 0:
        raise ValueError(f"split {split!r} has no rows to standardize")
    return _affine(total, sq, n)
