"""The augmentation registry (name → settings class and factory) and the CARROT adapter."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from pipeline.augment.base import AugmentedBatch, FeatureAugmentation
from pipeline.augment.peers import (
    DCAugmentation,
    DCSettings,
    GaussianAugmentation,
    GaussianSettings,
    IsdaAugmentation,
    IsdaSettings,
    MixupAugmentation,
    MixupSettings,
    NoAugmentation,
)
from pipeline.errors import InputError


class CarrotAugmentation:
    """``carrot``: wraps `pipeline.augment.carrot.CarrotAugment` (per head: its own z, logits, W).

    ``noise="class_cov"`` uses class-covariance factors (rank `CLASS_COV_RANK`) fitted on the
    post-LN training features. ``injection="pre_ln"`` (``pre_ln`` is True) takes the RAW
    batch ``x`` as ``z`` plus the head's LayerNorm ``ln`` and returns raw rows ``x̃``; the
    trainer then normalizes them through the head.
    """

    name = "carrot"
    per_head = True

    def __init__(self, settings: Any, *, num_classes: int) -> None:
        from pipeline.augment.carrot import CarrotAugment

        self.settings = settings
        self.num_classes = num_classes
        self.aug_weight = float(settings.aug_weight)
        self.pre_ln = getattr(settings, "injection", "post_ln") == "pre_ln"
        self.needs_fit = getattr(settings, "noise", "isotropic") == "class_cov"
        self.class_factor: torch.Tensor | None = None
        self._impl = CarrotAugment(settings)

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        from pipeline.augment.carrot import class_factor_from_features

        if self.needs_fit:
            self.class_factor = class_factor_from_features(
                X, y, num_classes=self.num_classes, rank=CLASS_COV_RANK
            )

    def __call__(
        self, z, y, logits, weight, *, generator, ln=None, bias=None, logits_error=None
    ) -> AugmentedBatch:
        """One head's augmented rows; the violation rate is left to the caller, which computes
        their logits (``measure=False``); ``logits_error`` see `carrot_augment`."""
        kwargs: dict[str, Any] = {"generator": generator, "bias": bias, "measure": False}
        if self.class_factor is not None:
            kwargs["class_factor"] = self.class_factor.to(z.device)
        if self.pre_ln:
            kwargs["ln"] = ln
        else:
            kwargs["logits_error"] = logits_error
        out = self._impl(z, y, logits, weight, **kwargs)
        return AugmentedBatch(
            z=out.z,
            y=out.y,
            source=out.source,
            diagnostics=dict(out.diagnostics or {}),
            delta=out.delta,
            gamma=out.gamma,
        )

    def augment_heads(self, z, y, logits, weight, generators, logits_error):
        """Every head of a group at once (z (h, B, D), logits (h, B, C), weight (h, C, D),
        ``logits_error`` broadcastable to (h, B, C), one generator per head):
        `carrot_augment_heads`'s output, or None where its settings are not covered (then the
        caller goes head by head)."""
        from pipeline.augment.carrot_heads import carrot_augment_heads, supports_heads

        if self.pre_ln or not supports_heads(self.settings, z.shape[-1], self.num_classes):
            return None
        return carrot_augment_heads(
            z,
            y,
            logits,
            weight,
            self.settings,
            logits_error=logits_error,
            generators=generators,
            workspace=self._impl.workspace,
        )


CLASS_COV_RANK = 16  # rank of the class-covariance factors CARROT's class_cov noise uses


# ----------------------------------------------------------------------------- registry
def _carrot_settings_class() -> type:
    from pipeline.augment.carrot import CarrotConfig

    return CarrotConfig


_Factory = Callable[[Any, int], FeatureAugmentation]
_REGISTRY: dict[str, tuple[Callable[[], type | None], _Factory]] = {
    "none": (lambda: None, lambda s, c: NoAugmentation()),
    "gaussian": (lambda: GaussianSettings, lambda s, c: GaussianAugmentation(s)),
    "isda": (lambda: IsdaSettings, lambda s, c: IsdaAugmentation(s, num_classes=c)),
    "dc": (lambda: DCSettings, lambda s, c: DCAugmentation(s, num_classes=c)),
    "mixup": (lambda: MixupSettings, lambda s, c: MixupAugmentation(s, num_classes=c)),
    "carrot": (_carrot_settings_class, lambda s, c: CarrotAugmentation(s, num_classes=c)),
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
    name: str, settings: Any = None, *, num_classes: int
) -> FeatureAugmentation:
    """Build augmentation ``name`` with ``settings`` (None = defaults)."""
    cls = settings_class(name)
    if settings is None and cls is not None:
        settings = cls()
    if cls is not None and not isinstance(settings, cls):
        raise InputError(
            f"augmentation {name!r} takes {cls.__name__} settings, got {type(settings).__name__}"
        )
    return _REGISTRY[name][1](settings, num_classes)
