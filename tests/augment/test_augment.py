"""Feature augmentations: shapes, labels, determinism, the statistics they claim."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from binomial_bounds import binomial_upper
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.augment import (
    AugmentedBatch,
    ClassStats,
    DCSettings,
    FeatureAugmentation,
    GaussianSettings,
    IsdaSettings,
    MixupSettings,
    augmentation_names,
    create_augmentation,
    default_settings,
    normalize,
    settings_from_dict,
)
from pipeline.augment.carrot import CarrotConfig, violation_rate
from pipeline.errors import InputError

C, D = 4, 6


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 2
    y = torch.arange(n) % C
    X = means[y] + torch.randn(n, D, generator=g) * torch.linspace(0.2, 2.0, D)
    return X, y


def _make(name, settings=None):
    aug = create_augmentation(name, settings, num_classes=C)
    X, y = _data()
    if aug.needs_fit:
        aug.fit(normalize(X), y)
    return aug, X, y


def _call(aug, z, y, seed, weight=None):
    g = torch.Generator().manual_seed(seed)
    logits = z @ weight.T if weight is not None else None
    return aug(z, y, logits, weight, generator=g)


def test_registry_lists_every_augmentation():
    assert augmentation_names() == ["none", "gaussian", "isda", "dc", "mixup", "carrot"]
    for name in augmentation_names():
        aug = create_augmentation(name, num_classes=C)
        assert isinstance(aug, FeatureAugmentation)
    assert isinstance(default_settings("carrot"), CarrotConfig)
    assert default_settings("none") is None


def test_registry_errors_name_the_problem():
    with pytest.raises(InputError, match="unknown augmentation"):
        create_augmentation("cutmix", num_classes=C)
    with pytest.raises(InputError, match="GaussianSettings"):
        create_augmentation("gaussian", MixupSettings(), num_classes=C)
    with pytest.raises(InputError, match="unknown isda settings"):
        settings_from_dict("isda", {"strenght": 1.0})
    assert settings_from_dict("dc", {"k": 3}) == DCSettings(k=3)


@pytest.mark.parametrize(
    ("name", "settings", "copies"),
    [
        ("gaussian", GaussianSettings(copies=2), 2),
        ("isda", IsdaSettings(rank=3, copies=3), 3),
        ("dc", DCSettings(k=2, rank=3), 1),
        ("mixup", MixupSettings(alpha=0.5), 1),
    ],
)
def test_shapes_labels_and_determinism(name, settings, copies):
    aug, X, y = _make(name, settings)
    z = normalize(X[:32])
    yb = y[:32]
    a = _call(aug, z, yb, seed=1)
    b = _call(aug, z, yb, seed=1)
    c = _call(aug, z, yb, seed=2)
    assert isinstance(a, AugmentedBatch)
    assert a.z.shape == (32 * copies, D) and a.y.shape == (32 * copies,)
    assert a.y.dtype == torch.int64 and a.source.dtype == torch.int64
    assert torch.equal(a.z, b.z) and torch.equal(a.y, b.y)  # same generator state → same rows
    assert not torch.equal(a.z, c.z)
    assert torch.isfinite(a.z).all()
    if name != "mixup":  # label-preserving augmentations keep the source row's label
        assert torch.equal(a.y, yb[a.source])


def test_none_adds_nothing():
    aug, X, y = _make("none")
    out = _call(aug, normalize(X[:8]), y[:8], seed=0)
    assert len(out) == 0 and out.z.shape == (0, D)


def _mix_partners(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    mixed: torch.Tensor,
    soft: torch.Tensor,
    s: int,
    tol: float = 1e-4,
) -> list[int]:
    """Batch rows j with ``mixed`` ≈ λ·z_s + (1−λ)·z_j for some λ in [0, 1] (λ fitted by least
    squares per j, float64) and ``soft`` = λ·e_{y_s} + (1−λ)·e_{y_j} for the same λ."""
    x, m = z.double(), mixed.double()
    one = torch.nn.functional.one_hot(y, num_classes).double()
    d = x[s] - x  # (B, D): direction from each candidate partner to the source row
    dd = d.square().sum(1)
    same = dd < tol**2  # z_j = z_s: the mix is z_s whatever λ
    lam = torch.where(same, torch.ones_like(dd), ((m - x) * d).sum(1) / dd.clamp_min(tol**2))
    row_err = (m - (lam[:, None] * x[s] + (1 - lam[:, None]) * x)).abs().amax(1)
    label_err = (soft.double() - (lam[:, None] * one[s] + (1 - lam[:, None]) * one)).abs().amax(1)
    ok = (lam >= -tol) & (lam <= 1 + tol) & (row_err <= tol) & (label_err <= tol)
    return torch.nonzero(ok).flatten().tolist()


@settings(deadline=None, max_examples=30)
@given(alpha=st.floats(0.05, 5.0), B=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_mixup_soft_labels_sum_to_one_and_match_the_mix(alpha, B, seed):
    aug = create_augmentation("mixup", MixupSettings(alpha=alpha), num_classes=C)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    out = aug(z, y, None, None, generator=g)
    assert out.y_soft is not None and out.y_soft.shape == (B, C)
    torch.testing.assert_close(out.y_soft.sum(1), torch.ones(B))
    assert (out.y_soft >= 0).all()
    # the hard label carries the larger share of the soft label
    share = out.y_soft.gather(1, out.y[:, None]).squeeze(1)
    assert (share >= 0.5 - 1e-6).all()
    # every mixed row is a convex combination λ·x_i + (1−λ)·x_j of its recorded source row i and
    # some batch row j, and its soft label is the same mix of the two one-hot labels
    assert torch.equal(out.source, torch.arange(B))
    for i, s in enumerate(out.source.tolist()):
        partners = _mix_partners(z, y, C, out.z[i], out.y_soft[i], s)
        assert partners, f"mixed row {i} is no convex mix of source row {s} and a batch row"


def test_isda_noise_has_the_class_covariance():
    X, y = _data(n=400)
    aug = create_augmentation("isda", IsdaSettings(strength=1.0, rank=D, copies=1), num_classes=C)
    aug.fit(normalize(X), y)
    cls = 1
    Z = normalize(X[y == cls])
    target = torch.cov(Z.T)
    z0 = Z[:1].repeat(4000, 1)
    out = aug(z0, torch.full((4000,), cls), None, None, generator=torch.Generator().manual_seed(0))
    noise = out.z - z0
    emp = torch.cov(noise.T)
    assert torch.allclose(emp, target, atol=0.15 * float(target.abs().max()))
    assert noise.mean(0).abs().max() < 0.1 * float(target.diag().max().sqrt())


def test_class_stats_factor_reproduces_covariance_at_full_rank():
    X, y = _data(n=300)
    Z = normalize(X)
    st_ = ClassStats.fit(Z, y, num_classes=C, rank=D)
    for c in range(C):
        L = st_.factors[c]
        torch.testing.assert_close(L @ L.T, torch.cov(Z[y == c].T), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st_.means[c], Z[y == c].mean(0))


def test_dc_samples_centre_on_the_calibrated_mean():
    X, y = _data(n=400)
    aug = create_augmentation(
        "dc", DCSettings(k=1, include_own=True, alpha=0.0, rank=D), num_classes=C
    )
    aug.fit(normalize(X), y)
    Z = normalize(X)
    row = Z[y == 2][:1]
    z0 = row.repeat(3000, 1)
    out = aug(z0, torch.full((3000,), 2), None, None, generator=torch.Generator().manual_seed(0))
    # own class mean is the nearest: calibrated mean = (z + μ_2) / 2
    mu = Z[y == 2].mean(0)
    expected = (row[0] + mu) / 2
    assert (out.z.mean(0) - expected).abs().max() < 0.1
    assert torch.equal(out.y, torch.full((3000,), 2))


def test_dc_excluding_own_class_uses_other_means():
    X, y = _data(n=400)
    aug = create_augmentation(
        "dc", DCSettings(k=1, include_own=False, alpha=0.0, rank=D), num_classes=C
    )
    aug.fit(normalize(X), y)
    Z = normalize(X)
    z0 = Z[y == 0][:1]
    out = aug(
        z0.repeat(2000, 1),
        torch.zeros(2000, dtype=torch.int64),
        None,
        None,
        generator=torch.Generator().manual_seed(0),
    )
    means = torch.stack([Z[y == c].mean(0) for c in range(C)])
    d = torch.cdist(z0, means)[0]
    d[0] = float("inf")
    expected = (z0[0] + means[int(d.argmin())]) / 2
    assert (out.z.mean(0) - expected).abs().max() < 0.1


def test_fit_is_required_before_use():
    aug = create_augmentation("isda", num_classes=C)
    with pytest.raises(RuntimeError, match="fit"):
        aug(torch.zeros(2, D), torch.zeros(2, dtype=torch.int64), None, None, generator=None)


def test_gaussian_noise_scale_follows_sigma():
    aug = create_augmentation("gaussian", GaussianSettings(sigma=0.2), num_classes=C)
    z = normalize(torch.randn(2000, D, generator=torch.Generator().manual_seed(0)))
    out = _call(aug, z, torch.zeros(2000, dtype=torch.int64), seed=3)
    std = float((out.z - z).std())
    assert std == pytest.approx(0.2, rel=0.05)


def test_carrot_wrapper_is_per_head_deterministic_and_label_safe():
    """Same generator state, same rows; labels are the source rows'; and each augmented copy
    keeps every margin under the head's own W with probability ≥ 1 − δ: the count of copies
    with a margin < γ is below the binomial(M, δ) upper quantile (error 1e-6)."""
    draws = 200
    cfg = CarrotConfig(topk=2, aug_per_sample=draws)
    aug = create_augmentation("carrot", cfg, num_classes=C)
    assert aug.per_head and not aug.needs_fit
    X, y = _data(n=64)
    z = normalize(X)
    W = torch.randn(C, D, generator=torch.Generator().manual_seed(0))
    a = _call(aug, z, y, seed=5, weight=W)
    b = _call(aug, z, y, seed=5, weight=W)
    c = _call(aug, z, y, seed=6, weight=W)
    assert torch.equal(a.z, b.z) and torch.equal(a.source, b.source)
    assert not torch.equal(a.z, c.z)
    assert len(a) > 0 and torch.equal(a.y, y[a.source])
    # the trainer measures violations on the logits it computes: the wrapper leaves them out
    assert "frac_augmented" in a.diagnostics and "violation_rate" not in a.diagnostics
    assert torch.allclose(a.z, z[a.source] + a.delta) and not a.delta.requires_grad
    logits = a.z.double() @ W.double().T
    margin = (logits.gather(1, a.y[:, None]) - logits).scatter(1, a.y[:, None], float("inf"))
    bad = (margin < cfg.gamma).any(dim=1)
    rate = violation_rate(a.z @ W.T, a.y, cfg.gamma)
    assert float(rate) == pytest.approx(float(bad.double().mean()))
    assert int(bad.sum()) <= binomial_upper(len(a), cfg.delta, 1e-6), float(bad.double().mean())


def test_carrot_class_cov_is_fitted_from_training_features():
    aug = create_augmentation("carrot", CarrotConfig(topk=2, noise="class_cov"), num_classes=C)
    assert aug.needs_fit
    X, y = _data()
    aug.fit(normalize(X), y)
    assert aug.class_factor is not None and aug.class_factor.shape[:2] == (C, D)
    W = torch.randn(C, D, generator=torch.Generator().manual_seed(1))
    out = _call(aug, normalize(X[:32]), y[:32], seed=0, weight=W)
    assert torch.isfinite(out.z).all()


@pytest.mark.parametrize("name", [n for n in augmentation_names() if n != "none"])
def test_settings_are_frozen_and_hashable(name):
    """Every augmentation's settings: no attribute can be set, and equal settings hash equal
    (a grid groups heads by them)."""
    s = default_settings(name)
    field = next(iter(dataclasses.fields(s))).name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(s, field, getattr(s, field))
    same = settings_from_dict(name, dataclasses.asdict(s))
    assert same == s and hash(same) == hash(s) and same is not s
    assert len({s, same}) == 1
    assert len({IsdaSettings(), IsdaSettings(), IsdaSettings(rank=2)}) == 2
