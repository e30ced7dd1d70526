"""Feature-space augmentations behind one interface, and their registry.

Every augmentation maps a batch of post-LayerNorm features to *extra* rows that the trainer adds
to the loss with weight ``aug_weight``:

    aug(z (B, D), y (B,), logits (B, C) | None, weight (C, D) | None, *, generator)
        -> AugmentedBatch(z (M, D), y (M,), source (M,), y_soft (M, C) | None)

Two kinds:

* ``per_head = False`` (none, gaussian, isda, dc, mixup): the result does not depend on the head.
  The bank calls it ONCE per augmentation group on the batch in the shared post-LN space
  ``z = γ₀ ⊙ x̂ + β₀`` (the preconditioning affine every head starts from; with the LayerNorm
  affine frozen, the default, it is every head's z) with ``logits = weight = None``, and feeds
  the rows to the heads.
* ``per_head = True`` (carrot): needs the head's own ``z``, logits and weight; called once per
  head with that head's tensors.

``fit(Z, y)`` takes post-LayerNorm training features ``Z (N, D)`` (the bank's shared,
preconditioned space ``z = γ ⊙ LN(x) + β``, see `pipeline.precondition`) and estimates what an
augmentation needs there. Random draws use ``generator`` (a torch.Generator on z's device) only,
so results are reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import InputError
from pipeline.heads import LN_EPS


@dataclass(frozen=True)
class AugmentedBatch:
    """Extra rows: ``z (M, D)``, hard labels ``y (M,) int64``, ``source (M,) int64`` (the input
    row each came from), optional soft labels ``y_soft (M, C)`` (rows sum to 1) and step
    diagnostics."""

    z: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor
    y_soft: torch.Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, like: torch.Tensor) -> AugmentedBatch:
        """No rows (``M = 0``)."""
        dev = like.device
        zero = torch.zeros(0, dtype=torch.int64, device=dev)
        return cls(z=like[:0], y=zero, source=zero)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@runtime_checkable
class FeatureAugmentation(Protocol):
    """The interface every augmentation implements (see the module docstring)."""

    name: str
    per_head: bool  # True: call once per head with its z/logits/weight
    needs_fit: bool  # True: call fit(X_train, y_train) before use
    aug_weight: float  # loss weight of the extra rows

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None: ...

    def __call__(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        logits: torch.Tensor | None,
        weight: torch.Tensor | None,
        *,
        generator: torch.Generator | None,
    ) -> AugmentedBatch: ...


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


class CarrotAugmentation:
    """``carrot``: wraps `pipeline.carrot.CarrotAugment` (per head: its own z, logits, W).

    ``noise="class_cov"`` uses class-covariance factors (rank `CLASS_COV_RANK`) fitted on the
    post-LN training features. ``injection="pre_ln"`` (``pre_ln`` is True) takes the RAW
    batch ``x`` as ``z`` plus the head's LayerNorm ``ln`` and returns raw rows ``x̃``; the
    trainer then normalizes them through the head.
    """

    name = "carrot"
    per_head = True

    def __init__(self, settings: Any, *, num_classes: int) -> None:
        from pipeline.carrot import CarrotAugment

        self.settings = settings
        self.num_classes = num_classes
        self.aug_weight = float(settings.aug_weight)
        self.pre_ln = getattr(settings, "injection", "post_ln") == "pre_ln"
        self.needs_fit = getattr(settings, "noise", "isotropic") == "class_cov"
        self.class_factor: torch.Tensor | None = None
        self._impl = CarrotAugment(settings)

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        from pipeline.carrot import class_factor_from_features

        if self.needs_fit:
            self.class_factor = class_factor_from_features(
                X, y, num_classes=self.num_classes, rank=CLASS_COV_RANK
            )

    def __call__(self, z, y, logits, weight, *, generator, ln=None, bias=None) -> AugmentedBatch:
        kwargs: dict[str, Any] = {"generator": generator, "bias": bias}
        if self.class_factor is not None:
            kwargs["class_factor"] = self.class_factor.to(z.device)
        if self.pre_ln:
            kwargs["ln"] = ln
        out = self._impl(z, y, logits, weight, **kwargs)
        return AugmentedBatch(
            z=out.z, y=out.y, source=out.source, diagnostics=dict(out.diagnostics or {})
        )


CLASS_COV_RANK = 16  # rank of the class-covariance factors CARROT's class_cov noise uses


# ----------------------------------------------------------------------------- registry
def _carrot_settings_class() -> type:
    from pipeline.carrot import CarrotConfig

    return CarrotConfig


_Factory = Callable[[Any, int, int], FeatureAugmentation]
_REGISTRY: dict[str, tuple[Callable[[], type | None], _Factory]] = {
    "none": (lambda: None, lambda s, c, d: NoAugmentation()),
    "gaussian": (lambda: GaussianSettings, lambda s, c, d: GaussianAugmentation(s)),
    "isda": (lambda: IsdaSettings, lambda s, c, d: IsdaAugmentation(s, num_classes=c)),
    "dc": (lambda: DCSettings, lambda s, c, d: DCAugmentation(s, num_classes=c)),
    "mixup": (lambda: MixupSettings, lambda s, c, d: MixupAugmentation(s, num_classes=c)),
    "carrot": (_carrot_settings_class, lambda s, c, d: CarrotAugmentation(s, num_classes=c)),
}


def augmentation_names() -> list[str]:
    """Registered augmentation names."""
    return list(_REGISTRY)


def settings_class(name: str) -> type | None:
    """The settings dataclass of augmentation ``name`` (None for ``none``)."""
    if name not in _REGISTRY:
        raise InputError(
            f"unknown augmentation {name!r}; choose one of {', '.join(augmentation_names())}"
        )
    return _REGISTRY[name][0]()


def default_settings(name: str) -> Any:
    """The default settings object of ``name`` (None for ``none``)."""
    cls = settings_class(name)
    return cls() if cls is not None else None


def settings_from_dict(name: str, d: dict[str, Any] | None) -> Any:
    """Rebuild a settings object from a dict of its fields (None → None)."""
    cls = settings_class(name)
    if d is None or cls is None:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise InputError(f"unknown {name} settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def create_augmentation(
    name: str, settings: Any = None, *, num_classes: int, dim: int
) -> FeatureAugmentation:
    """Build augmentation ``name`` with ``settings`` (None = defaults)."""
    cls = settings_class(name)
    if settings is None and cls is not None:
        settings = cls()
    if cls is not None and not isinstance(settings, cls):
        raise InputError(
            f"augmentation {name!r} takes {cls.__name__} settings, got {type(settings).__name__}"
        )
    return _REGISTRY[name][1](settings, num_classes, dim)
