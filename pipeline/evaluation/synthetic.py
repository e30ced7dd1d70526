"""A synthetic fine-grained feature generator: the offline testbed for the quality benchmark.

Features ``x = μ_y + N u + σ e`` in ``D`` dimensions:

- class means ``μ_y`` differ only inside a ``signal_rank``-dimensional subspace (fine-grained:
  classes are close, distinguished by a few directions), at typical pairwise distance
  ``separation``;
- ``N u`` is strong *shared* nuisance variation (pose, background, lighting): ``nuisance_rank``
  directions orthogonal to the signal subspace, each with standard deviation ``nuisance_strength``;
- ``σ e`` is small isotropic noise (``noise``);
- plus a common offset (``offset``): backbone embeddings are not centred, and LayerNorm sees that.

With few shots per class, a linear head can latch onto nuisance directions that happen to separate
the few training samples; label-safe augmentation should help exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic fine-grained problem (all lengths in feature units)."""

    classes: int = 50  # C
    dim: int = 256  # D
    signal_rank: int = 16  # dimension of the subspace the class means live in
    separation: float = 3.0  # typical distance between two class means
    nuisance_rank: int = 32  # shared nuisance directions (orthogonal to the signal subspace)
    nuisance_strength: float = 4.0  # std along each nuisance direction
    noise: float = 0.5  # isotropic std added to every coordinate
    offset: float = 2.0  # norm of a common mean shared by all classes
    train_per_class: int = 16  # pool the k shots are drawn from
    val_per_class: int = 0  # extra labelled validation rows (0: few-shot selection uses the shots)
    test_per_class: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.classes < 2:
            raise ValueError(f"classes={self.classes}: need at least 2 classes")
        if self.signal_rank + self.nuisance_rank > self.dim:
            raise ValueError(
                f"signal_rank + nuisance_rank = {self.signal_rank + self.nuisance_rank} exceeds "
                f"dim={self.dim}; lower the ranks or raise dim"
            )
        for name in ("separation", "nuisance_strength", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0")


@dataclass(frozen=True)
class SyntheticFeatures:
    """Generated features with labels and splits."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) str: "train" | "val" | "test"
    class_names: tuple[str, ...]
    config: SyntheticConfig

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Rows of one split: ``(X (n, D) float32, y (n,) int64)``."""
        mask = self.split == split
        return self.features[mask], self.labels[mask]


def make_synthetic(cfg: SyntheticConfig) -> SyntheticFeatures:
    """Draw a data set from ``cfg`` (deterministic given ``cfg.seed``)."""
    rng = np.random.default_rng(cfg.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((cfg.dim, cfg.signal_rank + cfg.nuisance_rank)))
    signal, nuisance = basis[:, : cfg.signal_rank], basis[:, cfg.signal_rank :]  # (D, r), (D, m)
    # class means: Gaussian coordinates in the signal subspace; E‖μ_a − μ_b‖ ≈ separation
    coords = rng.standard_normal((cfg.classes, cfg.signal_rank)) * (
        cfg.separation / np.sqrt(2 * cfg.signal_rank)
    )
    offset = rng.standard_normal(cfg.dim)
    offset *= cfg.offset / max(np.linalg.norm(offset), 1e-12)
    means = coords @ signal.T + offset  # (C, D)

    counts = {"train": cfg.train_per_class, "val": cfg.val_per_class, "test": cfg.test_per_class}
    per_class = sum(counts.values())
    labels = np.repeat(np.arange(cfg.classes), per_class)  # (N,)
    split_one = np.concatenate([np.full(n, s, dtype=object) for s, n in counts.items()])
    split = np.tile(split_one, cfg.classes).astype(str)
    n = labels.size
    u = rng.standard_normal((n, cfg.nuisance_rank)) * cfg.nuisance_strength
    e = rng.standard_normal((n, cfg.dim)) * cfg.noise
    x = means[labels] + u @ nuisance.T + e
    names = tuple(f"class_{i:03d}" for i in range(cfg.classes))
    return SyntheticFeatures(
        features=x.astype(np.float32),
        labels=labels.astype(np.int64),
        split=split,
        class_names=names,
        config=cfg,
    )
