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
preconditioned space ``z = γ ⊙ LN(x) + β``, see `pipeline.heads.precondition`) and estimates what an
augmentation needs there. Random draws use ``generator`` (a torch.Generator on z's device) only,
so results are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class AugmentedBatch:
    """Extra rows: ``z (M, D)``, hard labels ``y (M,) int64``, ``source (M,) int64`` (the input
    row each came from), optional soft labels ``y_soft (M, C)`` (rows sum to 1) and step
    diagnostics. ``delta (M, D)``, when set: the rows are ``z[source] + delta`` with ``delta``
    detached (so their logits are ``logits[source] + W·delta``); ``gamma``: the margin floor a
    label-safe augmentation's violations are counted against."""

    z: torch.Tensor
    y: torch.Tensor
    source: torch.Tensor
    y_soft: torch.Tensor | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    delta: torch.Tensor | None = None
    gamma: float = 0.0

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
