"""The synthetic fine-grained generator: shapes, determinism, and the structure it claims."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.synthetic import SyntheticConfig, make_synthetic


def test_shapes_splits_and_determinism() -> None:
    cfg = SyntheticConfig(
        classes=5,
        dim=32,
        signal_rank=4,
        nuisance_rank=8,
        train_per_class=3,
        val_per_class=2,
        test_per_class=4,
        seed=3,
    )
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    assert a.features.shape == (5 * 9, 32) and a.features.dtype == np.float32
    np.testing.assert_array_equal(a.features, b.features)
    x, y = a.select("train")
    assert x.shape == (15, 32) and np.bincount(y).tolist() == [3] * 5
    assert set(np.unique(a.split)) == {"train", "val", "test"}
    c = make_synthetic(SyntheticConfig(classes=5, dim=32, signal_rank=4, nuisance_rank=8, seed=4))
    assert not np.allclose(c.features[:3], a.features[:3])


def test_nuisance_dominates_and_is_shared() -> None:
    """Within-class spread is mostly nuisance; class means differ in a rank-r subspace only."""
    cfg = SyntheticConfig(
        classes=20,
        dim=64,
        signal_rank=4,
        nuisance_rank=8,
        noise=0.0,
        nuisance_strength=5.0,
        separation=12.0,
        test_per_class=200,
        seed=0,
    )
    d = make_synthetic(cfg)
    means = np.stack([d.features[d.labels == c].mean(0) for c in range(cfg.classes)])
    centred = means - means.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    # means live in signal_rank dims (sample noise of the means leaks a little into nuisance)
    assert sv[cfg.signal_rank] < 0.35 * sv[cfg.signal_rank - 1]
    within = d.features - means[d.labels]
    assert np.sqrt((within**2).sum(1).mean()) == pytest.approx(5.0 * np.sqrt(8), rel=0.1)
    # shared: with noise=0 every class varies in the same nuisance_rank directions ...
    m = cfg.nuisance_rank
    basis = np.linalg.svd(within, full_matrices=False)[2][:m].T  # (D, m) pooled over classes
    assert np.linalg.svd(within, compute_uv=False)[m] < 1e-4 * np.linalg.norm(within)
    for c in (0, cfg.classes // 2, cfg.classes - 1):
        own = within[d.labels == c]
        own_basis = np.linalg.svd(own, full_matrices=False)[2][:m].T
        np.testing.assert_allclose(own_basis @ own_basis.T, basis @ basis.T, atol=1e-4)
    # ... orthogonal to the signal: with the nuisance removed the means span signal_rank dims
    signal = centred - (centred @ basis) @ basis.T
    sv_signal = np.linalg.svd(signal, compute_uv=False)
    assert sv_signal[cfg.signal_rank] < 1e-4 * sv_signal[0]
    assert sv_signal[cfg.signal_rank - 1] > 0.1 * sv_signal[0]


def test_bad_config_names_the_knob() -> None:
    with pytest.raises(ValueError, match="signal_rank \\+ nuisance_rank"):
        SyntheticConfig(dim=8, signal_rank=4, nuisance_rank=8)
    with pytest.raises(ValueError, match="classes"):
        SyntheticConfig(classes=1)
