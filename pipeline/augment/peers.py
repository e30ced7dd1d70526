"""The peer augmentations CARROT is compared with: none, gaussian, isda, dc and mixup
(head-independent: ``per_head = False``). Interface: `pipeline.augment.base`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.base import AugmentedBatch
from pipeline.defaults import LN_EPS
from pipeline.errors import InputError


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GaussianSettings:
    """Isotropic Gaussian noise (NOT label-safe; a control)."""

    sigma: float = 0.1  # noise std, relative to each row's RMS (≈1 after LayerNorm)
    copies: int = 1  # augmented rows per input row
    aug_weight: float = 1.0  # loss weight of the augmented rows


@dataclass(frozen=True)
class IsdaSettings:
    """ISDA-style: Gaussian noise with the sample's class covariance (low-rank factor)."""

    strength: float = 0.5  # λ: noise covariance is λ·Σ_y
    rank: int = 16  # rank r of each class's covariance factor (top principal directions)
    copies: int = 1
    aug_weight: float = 1.0
    max_per_class: int = 512  # training rows per class used to estimate Σ_y


@dataclass(frozen=True)
class DCSettings:
    """Distribution-calibration-style sampling (Yang et al. 2021, adapted; see `DCAugmentation`)."""

    k: int = 2  # nearest class means used to calibrate
    include_own: bool = True  # the sample's own class may be among the k (label-safer)
    alpha: float = 0.1  # isotropic spread added to the calibrated covariance, × mean variance
    rank: int = 16
    copies: int = 1
    aug_weight: float = 1.0
    max_per_class: int = 512


@dataclass(frozen=True)
class MixupSettings:
    """Feature mixup within the batch, with soft labels."""

    alpha: float = 0.2  # λ ~ Beta(alpha, alpha)
    aug_weight: float = 1.0


# ----------------------------------------------------------------------------- helpers
def normalize(X: torch.Tensor) -> torch.Tensor:
    """The head-independent LayerNorm (no affine) every head starts from: ``(N, D) -> (N, D)``."""
    return F.layer_norm(X.float(), (X.shape[-1],), eps=LN_EPS)


@dataclass(frozen=True)
class ClassStats:
    """Per-class means ``(C, D)``, covariance factors ``(C, D, r)`` (``Σ_c ≈ L_c L_cᵀ``), counts
    ``(C,)`` and the mean per-dimension variance (a scalar tensor). No D×D matrix is formed."""

    means: torch.Tensor
    factors: torch.Tensor
    counts: torch.Tensor
    mean_var: torch.Tensor

    @classmethod
    def fit(cls, Z: torch.Tensor, y: torch.Tensor, *, num_classes: int, rank: int) -> ClassStats:
        """Estimate from features ``Z (N, D)`` (already normalized) and labels ``y (N,)``."""
        N, D = Z.shape
        r = max(1, min(rank, D))
        means = torch.zeros(num_classes, D, device=Z.device)
        factors = torch.zeros(num_classes, D, r, device=Z.device)
        counts = torch.bincount(y, minlength=num_classes)
        for c in torch.unique(y).tolist():  # a loop over classes (once), never over samples
            Zc = Z[y == c]
            means[c] = Zc.mean(0)
            if Zc.shape[0] < 2:
                continue
            Xc = (Zc - means[c]) / math.sqrt(Zc.shape[0] - 1)
            _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
            k = min(r, S.shape[0])
            factors[c, :, :k] = Vh[:k].T * S[:k]
        var = Z.var(0, unbiased=False).mean() if N > 1 else torch.zeros((), device=Z.device)
        return cls(means=means, factors=factors, counts=counts, mean_var=var)


def _check_fitted(stats: ClassStats | None, name: str) -> ClassStats:
    if stats is None:
        raise RuntimeError(f"augmentation {name!r} needs fit(X_train, y_train) before use")
    return stats


def _repeat(z: torch.Tensor, y: torch.Tensor, copies: int):
    src = torch.arange(z.shape[0], device=z.device).repeat(copies)
    return z[src], y[src], src


# ----------------------------------------------------------------------------- implementations
class NoAugmentation:
    """``none``: no extra rows."""

    name = "none"
    per_head = False
    needs_fit = False
    aug_weight = 0.0

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def __call__(self, z, y, logits, weight, *, generator) -> AugmentedBatch:
        return AugmentedBatch.empty(z)


class GaussianAugmentation:
    """``gaussian``: ``z̃ = z + sigma · rms(z) · ε``, ``ε ~ N(0, I_D)``; labels copied (not
    label-safe: a control)."""

    name = "gaussian"
    per_head = False
    needs_fit = False

    def __init__(self, settings: GaussianSettings) -> None:
        self.settings = settings
        self.aug_weight = settings.aug_weight

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def __call__(self, z, y, logits, weight, *, generator) -> AugmentedBatch:
        zr, yr, src = _repeat(z, y, self.settings.copies)
        rms = zr.detach().pow(2).mean(-1, keepdim=True).sqrt()
        eps = torch.randn(zr.shape, generator=generator, device=z.device, dtype=z.dtype)
        return AugmentedBatch(z=zr + self.settings.sigma * rms * eps, y=yr, source=src)


class _ClassStatsAugmentation:
    """Shared by augmentations that sample from per-class statistics of the training features
    (fitted once on post-LN rows; ``settings.rank`` factors per class)."""

    name = ""
    per_head = False
    needs_fit = True

    def __init__(self, settings: Any, *, num_classes: int) -> None:
        self.settings = settings
        self.aug_weight = settings.aug_weight
        self.num_classes = num_classes
        self.stats: ClassStats | None = None

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.stats = ClassStats.fit(X, y, num_classes=self.num_classes, rank=self.settings.rank)


class IsdaAugmentation(_ClassStatsAugmentation):
    """``isda``: explicit ISDA-style sampling ``z̃ = z + √λ · L_y u``, ``u ~ N(0, I_r)``, with
    ``L_y (D, r)`` the class-covariance factor fitted on the training features."""

    name = "isda"

    def __call__(self, z, y, logits, weight, *, generator) -> AugmentedBatch:
        st = _check_fitted(self.stats, self.name)
        zr, yr, src = _repeat(z, y, self.settings.copies)
        L = st.factors.to(z.device, z.dtype)[yr]  # (M, D, r)
        u = torch.randn(
            (zr.shape[0], L.shape[2], 1), generator=generator, device=z.device, dtype=z.dtype
        )
        noise = torch.bmm(L, u).squeeze(-1)  # (M, D)
        return AugmentedBatch(z=zr + math.sqrt(self.settings.strength) * noise, y=yr, source=src)


class DCAugmentation(_ClassStatsAugmentation):
    """``dc``: distribution-calibration-style sampling.

    For a row ``z`` of class ``y``, the k class means nearest to ``z`` (the own class allowed when
    ``include_own``) calibrate a Gaussian: mean ``μ' = (z + Σ_j μ_j) / (k + 1)``, covariance
    ``Σ' = (1/k) Σ_j Σ_j + α·v̄·I`` (``v̄`` the mean per-dimension variance); new rows are drawn
    from ``N(μ', Σ')`` with label ``y``. Drawn as ``Σ_j L_j u_j / √k + √(α v̄) ε``: no D×D matrix.
    (In the original, "base" classes are disjoint from the novel ones; here every training class
    is a base class, so ``include_own`` keeps the calibration near the row's own class.)
    """

    name = "dc"

    def __init__(self, settings: DCSettings, *, num_classes: int) -> None:
        if settings.k < 1:
            raise InputError(f"dc k must be >= 1, got {settings.k}")
        super().__init__(settings, num_classes=num_classes)

    def __call__(self, z, y, logits, weight, *, generator) -> AugmentedBatch:
        st = _check_fitted(self.stats, self.name)
        s = self.settings
        zr, yr, src = _repeat(z, y, s.copies)
        means = st.means.to(z.device, z.dtype)
        present = st.counts.to(z.device) > 0
        dist = torch.cdist(zr.detach(), means)  # (M, C)
        dist = dist.masked_fill(~present[None], float("inf"))
        if not s.include_own:
            dist = dist.scatter(1, yr[:, None], float("inf"))
        k = max(1, min(s.k, int(present.sum()) - (0 if s.include_own else 1)))
        nn_idx = dist.topk(k, dim=1, largest=False).indices  # (M, k)
        mu = (zr + means[nn_idx].sum(1)) / (k + 1)
        L = st.factors.to(z.device, z.dtype)[nn_idx]  # (M, k, D, r)
        M, _, D, r = L.shape
        u = torch.randn((M, k, r, 1), generator=generator, device=z.device, dtype=z.dtype)
        noise = torch.matmul(L, u).squeeze(-1).sum(1) / math.sqrt(k)  # (M, D)
        iso = torch.randn((M, D), generator=generator, device=z.device, dtype=z.dtype)
        noise = noise + math.sqrt(s.alpha * float(st.mean_var)) * iso
        return AugmentedBatch(z=mu + noise, y=yr, source=src)


class MixupAugmentation:
    """``mixup``: ``z̃ = λ z_i + (1-λ) z_π(i)`` within the batch, ``λ ~ Beta(α, α)`` per row;
    soft labels ``λ·e_y_i + (1-λ)·e_y_π(i)``; hard label = the larger part's."""

    name = "mixup"
    per_head = False
    needs_fit = False

    def __init__(self, settings: MixupSettings, *, num_classes: int) -> None:
        if settings.alpha <= 0:
            raise InputError(f"mixup alpha must be > 0, got {settings.alpha}")
        self.settings = settings
        self.aug_weight = settings.aug_weight
        self.num_classes = num_classes

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        return None

    def __call__(self, z, y, logits, weight, *, generator) -> AugmentedBatch:
        B = z.shape[0]
        perm = torch.randperm(B, generator=generator, device=z.device)
        # Beta draws from a NumPy generator seeded by the torch generator: reproducible.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=z.device).item())
        a = self.settings.alpha
        lam_np = np.random.default_rng(seed).beta(a, a, size=B).astype(np.float32)
        lam = torch.as_tensor(lam_np, device=z.device, dtype=z.dtype)
        mixed = lam[:, None] * z + (1 - lam[:, None]) * z[perm]
        one = F.one_hot(y, self.num_classes).to(z.dtype)
        y_soft = lam[:, None] * one + (1 - lam[:, None]) * one[perm]
        y_hard = torch.where(lam >= 0.5, y, y[perm])
        src = torch.arange(B, device=z.device)
        return AugmentedBatch(z=mixed, y=y_hard, source=src, y_soft=y_soft)
