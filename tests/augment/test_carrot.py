"""Unit tests of pipeline.augment.carrot: config, output contract, gradient, determinism, class mode and
its cache, caps, class-covariance noise, bf16, the loss, and pre-LN injection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from binomial_bounds import binomial_upper
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.augment import nuisance
from pipeline.augment.carrot import (
    CarrotAugment,
    CarrotConfig,
    CarrotOutput,
    augment_with_geometry,
    carrot_augment,
    carrot_augment_pre_ln,
    carrot_loss,
    class_factor_from_features,
)
from pipeline.augment.nuisance import (
    centered_weight,
    competitor_geometry,
    nearest_classes,
    tail_quantile_sq,
    top_competitors,
)


def problem(*, b=16, d=24, c=12, seed=0, dtype=torch.float32):
    """Well-separated classes: z = 2·w_y + noise, so most rows have every margin positive."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    z = (2.0 * w[y] + 0.3 * torch.randn(b, d, generator=g)).to(dtype)
    return z, y, w, z.float() @ w.T


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def margins64(z, y, w):
    logits = z.double() @ w.double().T
    return logits.gather(1, y[:, None]) - logits


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"topk": 0},
        {"topk": 2.5},
        {"topk": True},
        {"delta": 0.0},
        {"delta": 0.5},
        {"gamma": -0.1},
        {"gamma": math.inf},
        {"mode": "batch"},
        {"aug_per_sample": 0},
        {"aug_weight": -1.0},
        {"refresh": 0},
        {"alpha_max": 0.0},
        {"alpha_max": math.nan},
        {"noise": "gaussian"},
        {"quantile": "normal"},
        {"injection": "mid"},
        {"refine": 0},
    ],
)
def test_config_rejects_bad_values_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=f"CarrotConfig.{field}"):
        CarrotConfig(**bad)


def test_config_defaults():
    cfg = CarrotConfig()
    assert (cfg.topk, cfg.delta, cfg.gamma, cfg.mode, cfg.aug_per_sample) == (
        10,
        0.05,
        0.0,
        "sample",
        1,
    )
    assert (cfg.refresh, cfg.alpha_max, cfg.noise, cfg.quantile, cfg.injection) == (
        50,
        None,
        "isotropic",
        "exact",
        "post_ln",
    )
    # one warm-up setting for every augmentation: the trainer's, not CARROT's
    assert not hasattr(cfg, "warmup_epochs")


def test_bad_inputs_raise_clear_errors():
    z, y, w, logits = problem()
    with pytest.raises(ValueError, match="at least 2 classes"):
        carrot_augment(z, y, logits[:, :1], w[:1], CarrotConfig())
    with pytest.raises(ValueError, match="weight"):
        carrot_augment(z[:, :5], y, logits, w, CarrotConfig())
    with pytest.raises(ValueError, match="class_factor"):
        carrot_augment(z, y, logits, w, CarrotConfig(noise="class_cov"))
    with pytest.raises(ValueError, match="pre_ln"):
        carrot_augment(z, y, logits, w, CarrotConfig(injection="pre_ln"))


# --- output contract ------------------------------------------------------------------------


def test_output_contract_copy_major_rows_and_diagnostics():
    z, y, w, logits = problem(b=20)
    out = carrot_augment(z, y, logits, w, CarrotConfig(topk=3, aug_per_sample=3), generator=gen())
    assert isinstance(out, CarrotOutput)
    rows = torch.nonzero(out.alpha > 0).squeeze(1)
    assert 0 < rows.numel() <= 20
    assert out.alpha.shape == (20,) and out.alpha.dtype == torch.float32
    assert out.source.dtype == torch.int64 and torch.equal(out.source, rows.repeat(3))
    assert torch.equal(out.y, y[out.source]) and out.z.shape == (3 * rows.numel(), 24)
    # every copy is a different draw of the same row
    m = rows.numel()
    assert not torch.allclose(out.z[:m], out.z[m : 2 * m])
    diag = out.diagnostics
    assert set(diag) == {"frac_augmented", "median_alpha", "median_noise_ratio", "violation_rate"}
    assert float(diag["frac_augmented"]) == pytest.approx(m / 20)
    assert float(diag["median_alpha"]) == pytest.approx(float(out.alpha[rows].median()))
    ratio = (out.z - z[out.source]).norm(dim=1) / z[out.source].norm(dim=1)
    assert float(diag["median_noise_ratio"]) == pytest.approx(float(ratio.median()), rel=1e-5)
    violated = (
        (margins64(out.z, out.y, w).scatter(1, out.y[:, None], 1.0) < 0).any(1).float().mean()
    )
    assert float(diag["violation_rate"]) == pytest.approx(float(violated))


def test_misclassified_rows_are_not_augmented_and_no_rows_gives_empty_output():
    z, y, w, logits = problem()
    wrong = (y + 1) % w.shape[0]
    out = carrot_augment(z, wrong, logits, w, CarrotConfig(), generator=gen())
    assert out.z.shape == (0, z.shape[1]) and (out.alpha == 0).all()
    assert float(out.diagnostics["frac_augmented"]) == 0.0
    loss = carrot_loss(w, z, wrong, out, 1.0)
    assert torch.allclose(loss, F.cross_entropy(z @ w.T, wrong))


def test_deterministic_given_generator():
    z, y, w, logits = problem()
    cfg = CarrotConfig(topk=4, aug_per_sample=2)
    a = carrot_augment(z, y, logits, w, cfg, generator=gen(5))
    b = carrot_augment(z, y, logits, w, cfg, generator=gen(5))
    c = carrot_augment(z, y, logits, w, cfg, generator=gen(6))
    assert torch.equal(a.z, b.z) and torch.equal(a.alpha, b.alpha)
    assert not torch.equal(a.z, c.z)
    assert torch.equal(a.alpha, c.alpha)  # α depends on the geometry only (no cap)


def test_noise_is_orthogonal_to_kset_differences_and_alpha_is_the_union_bound():
    z, y, w, logits = problem(b=8, d=32, c=20)
    cfg = CarrotConfig(topk=5)
    out = carrot_augment(z, y, logits, w, cfg, generator=gen())
    rows = out.source
    kset = top_competitors(logits, y, 5)[rows]
    w64 = w.double()
    diffs = w64[out.y][:, None, :] - w64[kset]  # (M, K, D)
    noise = out.z.double() - z.double()[rows]
    assert (diffs @ noise[:, :, None]).abs().max() < 1e-5 * noise.norm()
    # α = min over outside classes of m²/(‖P_N d‖² q²), recomputed with an explicit projector
    q2 = tail_quantile_sq(0.05, 20 - 1 - 5, "exact")
    for i, row in enumerate(rows.tolist()):
        q, _ = torch.linalg.qr(diffs[i].T)
        p_n = torch.eye(32, dtype=torch.float64) - q @ q.T
        outside = [c for c in range(20) if c != int(y[row]) and c not in kset[i].tolist()]
        d_out = w64[int(y[row])] - w64[outside]
        m_out = d_out @ z[row].double()
        expect = (m_out.square() / ((d_out @ p_n).square().sum(1) * q2)).min()
        assert float(out.alpha[row]) == pytest.approx(float(expect), rel=1e-4)


def test_chernoff_quantile_is_more_conservative():
    z, y, w, logits = problem()
    exact = carrot_augment(z, y, logits, w, CarrotConfig(topk=3), generator=gen())
    loose = carrot_augment(
        z, y, logits, w, CarrotConfig(topk=3, quantile="chernoff"), generator=gen()
    )
    on = exact.alpha > 0
    assert (loose.alpha[on] < exact.alpha[on]).all()
    ratio = tail_quantile_sq(0.05, 8, "exact") / tail_quantile_sq(0.05, 8, "chernoff")
    assert torch.allclose(
        loose.alpha[on] / exact.alpha[on], torch.tensor(ratio, dtype=torch.float32)
    )


# --- gradient -------------------------------------------------------------------------------


def test_gradient_reaches_z_and_layernorm_but_not_alpha():
    z_raw, y, w, _ = problem()
    ln = nn.LayerNorm(z_raw.shape[1])
    x = z_raw.clone().requires_grad_(True)
    z = ln(x)
    out = carrot_augment(z, y, (z @ w.T).detach(), w, CarrotConfig(topk=3), generator=gen())
    assert out.z.shape[0] > 0 and out.z.requires_grad
    assert not out.alpha.requires_grad
    out.z.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert ln.weight.grad.abs().sum() > 0 and ln.bias.grad.abs().sum() > 0


def test_backward_through_augmentation_is_the_identity_on_z():
    z0, y, w, logits = problem(b=10)
    z = z0.clone().requires_grad_(True)
    out = carrot_augment(z, y, logits, w, CarrotConfig(topk=3, aug_per_sample=2), generator=gen())
    upstream = torch.randn(out.z.shape, generator=gen(3))
    out.z.backward(upstream)
    expect = torch.zeros_like(z0).index_add_(0, out.source, upstream)
    assert torch.equal(z.grad, expect)


# --- class mode and the module ----------------------------------------------------------------


def test_class_mode_equals_per_sample_computation_with_its_own_kset():
    z, y, w, logits = problem(b=24, c=10)
    cfg = CarrotConfig(topk=3, mode="class", aug_per_sample=2)
    out = carrot_augment(z, y, logits, w, cfg, generator=gen())
    wc = centered_weight(w)
    gram = wc @ wc.T
    kset = nearest_classes(gram, 3)[y]  # the K nearest class weights, shared within a class
    geo = competitor_geometry(wc, gram, y, kset)  # computed row by row, "sample" style
    ref = augment_with_geometry(z, y, w, cfg, geo, generator=gen())
    assert torch.equal(out.source, ref.source)
    assert torch.allclose(out.z, ref.z, rtol=0, atol=1e-5) and torch.allclose(
        out.alpha, ref.alpha, rtol=1e-6
    )
    # rows of one class share the same competitor set
    for c in y.unique():
        assert (kset[y == c] == kset[y == c][0]).all()


def test_module_sample_mode_matches_function():
    z, y, w, logits = problem()
    cfg = CarrotConfig(topk=4)
    a = CarrotAugment(cfg)(z, y, logits, w, generator=gen())
    b = carrot_augment(z, y, logits, w, cfg, generator=gen())
    assert torch.equal(a.z, b.z)


def test_module_class_mode_caches_and_refreshes_geometry():
    z, y, w0, logits = problem(b=20, c=10)
    cfg = CarrotConfig(topk=3, mode="class", refresh=3)
    aug = CarrotAugment(cfg)
    first = aug(z, y, logits, w0, generator=gen())
    stateless = carrot_augment(z, y, logits, w0, cfg, generator=gen())
    assert aug.refresh_count == 1 and torch.allclose(first.z, stateless.z, atol=1e-5)
    cached = aug.class_geometry(w0)  # call 2
    w1 = w0 + 0.05 * torch.randn(w0.shape, generator=gen(9))
    third = aug(z, y, logits, w1, generator=gen())  # call 3: still the cached (w0) geometry
    assert aug.refresh_count == 1
    stale = augment_with_geometry(z, y, w1, cfg, cached.take(y), generator=gen())
    fresh = carrot_augment(z, y, logits, w1, cfg, generator=gen())
    assert torch.equal(third.z, stale.z) and not torch.allclose(third.z, fresh.z)
    fourth = aug(z, y, logits, w1, generator=gen())  # call 4: refreshed from w1
    assert aug.refresh_count == 2 and torch.allclose(fourth.z, fresh.z, atol=1e-5)
    aug(z[:, :8], y, logits, w1[:, :8].contiguous(), generator=gen())  # new shape: refresh now
    assert aug.refresh_count == 3


@pytest.mark.parametrize("noise", ["isotropic", "class_cov"])
def test_stale_class_geometry_is_safe_for_the_moved_weight(noise):
    """The geometry cached from w0 serves a weight w1 that moved: every row's violation rate
    against w1 stays within the binomial bound of δ (Kset classes are now in the union
    bound), and the Kset margins of w0 (the cached geometry's own weight) stay exact."""
    from scipy.stats import binom

    b, d, c, draws = 16, 16, 30, 2000
    z, y, w0, _ = problem(b=b, d=d, c=c, seed=3)
    feats = torch.randn(600, d, generator=gen(2)) * torch.linspace(0.1, 2.0, d)
    factor = class_factor_from_features(
        feats, torch.randint(0, c, (600,), generator=gen(3)), num_classes=c, rank=4
    )
    cfg = CarrotConfig(topk=6, mode="class", noise=noise, aug_per_sample=draws)
    aug = CarrotAugment(cfg)
    aug(z, y, z @ w0.T, w0, generator=gen(), class_factor=factor)  # geometry from w0
    w1 = w0 + 0.3 * torch.randn(w0.shape, generator=gen(9))
    out = aug(z, y, z @ w1.T, w1, generator=gen(4), class_factor=factor)
    assert aug.refresh_count == 1 and out.z.shape[0] > 0
    margins = margins64(out.z, out.y, w1).scatter(1, out.y[:, None], float("inf"))
    bad = (margins < 0).any(dim=1).double().view(draws, -1).sum(dim=0)
    assert (bad <= binom.ppf(1 - 1e-3 / b, draws, cfg.delta)).all(), bad
    kset = aug.class_geometry(w1).kset[out.y]  # still the w0 geometry (third call of 50)
    before = margins64(z, y, w0)[out.source].gather(1, kset)
    after = margins64(out.z, out.y, w0).gather(1, kset)
    assert ((after - before).abs() <= 1e-4 * (1 + before.abs())).all()


def test_distinct_rows_gives_one_row_per_class():
    _, y, w0, _ = problem(b=20, d=40, c=30, seed=2)
    aug = CarrotAugment(CarrotConfig(topk=6, mode="class"))
    geo = aug.class_geometry(w0).take(y)
    first, inverse = nuisance.distinct_rows(geo)
    assert torch.equal(geo.labels[first][inverse], geo.labels)  # one row per class
    assert first.numel() == y.unique().numel()


def test_module_class_mode_reuses_workspace_across_batch_shapes():
    z, y, w, logits = problem(b=24, c=10)
    cfg = CarrotConfig(topk=3, mode="class", aug_per_sample=2)
    aug = CarrotAugment(cfg)
    for rows in (24, 7, 24):  # the scratch buffers must follow the batch shape
        out = aug(z[:rows], y[:rows], logits[:rows], w, generator=gen())
        ref = carrot_augment(z[:rows], y[:rows], logits[:rows], w, cfg, generator=gen())
        assert torch.equal(out.source, ref.source) and torch.allclose(out.z, ref.z, atol=1e-6)
    assert aug.refresh_count == 1


def test_float64_features_use_the_float64_projection_and_agree():
    z, y, w, logits = problem(b=20, c=10)
    for mode in ("sample", "class"):
        cfg = CarrotConfig(topk=3, mode=mode)
        single = carrot_augment(z, y, logits, w, cfg, generator=gen())
        double = carrot_augment(z.double(), y, logits, w, cfg, generator=gen())
        assert double.z.dtype == torch.float64 and torch.equal(single.source, double.source)
        assert torch.allclose(single.z.double(), double.z, atol=1e-4)
        assert torch.allclose(single.alpha, double.alpha, rtol=1e-4)


def test_margins_fall_back_to_float64_when_float32_matmul_is_not_ieee():
    z, y, w, logits = problem(b=20, c=10)
    w[3] = w[4]  # a duplicate class: its rows must stay ineligible on both paths
    cfg = CarrotConfig(topk=3)
    ieee = carrot_augment(z, y, logits, w, cfg, generator=gen())
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert not nuisance._ieee_fp32_matmul(torch.device("cpu"))
        fallback = carrot_augment(z, y, logits, w, cfg, generator=gen())
    finally:
        torch.set_float32_matmul_precision(previous)
    assert torch.equal(ieee.source, fallback.source)
    assert torch.allclose(ieee.alpha, fallback.alpha, rtol=1e-4)
    assert (ieee.alpha[(y == 3) | (y == 4)] == 0).all()


# --- caps, edge cases -----------------------------------------------------------------------


def test_alpha_max_caps_the_relative_noise_norm():
    z, y, w, logits = problem(d=32, c=20)
    free = carrot_augment(z, y, logits, w, CarrotConfig(topk=3, aug_per_sample=4), generator=gen())
    capped_cfg = CarrotConfig(topk=3, aug_per_sample=4, alpha_max=0.05)
    capped = carrot_augment(z, y, logits, w, capped_cfg, generator=gen())
    ratio = (capped.z - z[capped.source]).norm(dim=1) / z[capped.source].norm(dim=1)
    assert float(ratio.max()) <= 0.05 * (1 + 1e-5)
    assert float((free.z - z[free.source]).norm(dim=1).max() / z.norm(dim=1).max()) > 0.05
    assert (capped.alpha <= free.alpha).all() and (capped.alpha > 0).sum() == (free.alpha > 0).sum()


def test_two_classes_only_the_default_cap_bounds_the_noise():
    z, y, w, logits = problem(c=2, b=12)
    out = carrot_augment(z, y, logits, w, CarrotConfig(), generator=gen())
    assert out.z.shape[0] > 0
    ratio = (out.z - z[out.source]).norm(dim=1) / z[out.source].norm(dim=1)
    assert float(ratio.max()) <= 1.0 + 1e-5
    before, after = margins64(z, y, w)[out.source], margins64(out.z, out.y, w)
    assert torch.allclose(after, before, atol=1e-4 * (1 + before.abs().max().item()))


def test_degenerate_inputs_never_produce_nan():
    z, y, w, logits = problem(b=6, d=3, c=8)
    cases = [
        (torch.zeros_like(z), w),  # zero features
        (z, torch.zeros_like(w)),  # zero weights
        (z, torch.cat([w[:4], w[:4]])),  # every class duplicated
        (torch.full_like(z, float("nan")), w),  # non-finite features
    ]
    for zz, ww in cases:
        out = carrot_augment(zz, y, logits, ww, CarrotConfig(topk=5), generator=gen())
        assert torch.isfinite(out.alpha).all() and out.z.shape[0] == 0
    out = carrot_augment(z, y, logits, w, CarrotConfig(topk=7), generator=gen())  # D < K
    assert out.z.shape[0] == 0


# --- K ≥ D: the geometry in D dimensions -----------------------------------------------------


def subspace_problem(*, b=24, d=32, c=60, sub=12, generic=8, seed=0):
    """Rank-deficient K > D: c − generic class weights in a ``sub``-dim subspace of R^d, the last
    ``generic`` classes far outside it; labels from the subspace classes. Their competitors
    span less than R^d, and the generic classes bound α."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, sub, generator=g)).Q  # (D, sub)
    w = torch.randn(c, sub, generator=g) @ basis.T
    w[c - generic :] = 1.5 * torch.randn(generic, d, generator=g)
    y = torch.randint(0, c - generic, (b,), generator=g)
    z = 2.0 * w[y] + 0.3 * torch.randn(b, d, generator=g)
    return z, y, w, z @ w.T


def kset_of(mode, logits, y, w, k):
    wc = centered_weight(w)
    return top_competitors(logits, y, k) if mode == "sample" else nearest_classes(wc @ wc.T, k)[y]


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_k_at_least_d_on_the_full_span_augments_nothing(mode):
    z, y, w, logits = problem(b=16, d=32, c=60)
    for topk in (32, 40, 59, 100):
        out = carrot_augment(z, y, logits, w, CarrotConfig(topk=topk, mode=mode), generator=gen())
        assert out.z.shape[0] == 0 and (out.alpha == 0).all()
    wc = centered_weight(w)
    geo = competitor_geometry(wc, wc @ wc.T, y, kset_of(mode, logits, y, w, 40), basis=True)
    assert geo.pinv is None and (geo.rank == 32).all()  # D-dimensional form, full span
    assert geo.basis.shape == (16, 32, 32) and torch.equal(geo.basis[0], torch.eye(32))


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_k_above_d_rank_deficient_geometry_matches_an_explicit_projector(mode):
    _, y, w, logits = subspace_problem()
    wc = centered_weight(w)
    kset = kset_of(mode, logits, y, w, 40)
    geo = competitor_geometry(wc, wc @ wc.T, y, kset)
    assert geo.pinv is None and geo.basis.dtype == torch.float64
    eta = nuisance.ETA_PER_COMPETITOR * 40
    for n in range(y.shape[0]):
        a = wc[y[n]] - wc[kset[n]]  # (K, D), K = 40 > D = 32
        # float32 weights lie in the subspace to ~1e-7: singular values below √RTOL·σ_max drop
        p_n = torch.eye(32, dtype=torch.float64) - torch.linalg.pinv(a, rtol=1e-5) @ a
        assert int(geo.rank[n]) == int(torch.linalg.matrix_rank(a, rtol=1e-5)) < 32
        diffs = wc[y[n]] - wc  # (C, D)
        exact = (diffs @ p_n).square().sum(1)
        length = diffs.square().sum(1)
        out = geo.outside[n]
        got = geo.nuisance_var[n][out]
        assert (got >= exact[out] - 1e-9).all()  # never underestimated
        assert torch.allclose(got, exact[out], rtol=0, atol=1e-9 + 2 * eta * length.max())
        q = geo.basis[n]  # orthonormal rows (zero rows for dropped directions) spanning S
        assert torch.allclose(q @ q.T, torch.diag((q.norm(dim=1) > 0.5).double()), atol=1e-10)
        assert (a - a @ q.T @ q).norm() <= 1e-6 * a.norm()  # Kset differences lie in S (to ~u32)


@pytest.mark.parametrize(("mode", "topk"), [("sample", 40), ("class", 40), ("sample", 59)])
def test_k_above_d_rank_deficient_is_exact_and_safe(mode, topk):
    """K > D with rank < D: rows are augmented, Kset margins stay exact, and the violation
    rate of every row is within the binomial bound of δ — fresh, and through a stale cached
    class geometry (float32 basis) for a moved weight."""
    from scipy.stats import binom

    z, y, w, logits = subspace_problem()
    draws, b = 2000, y.shape[0]
    cfg = CarrotConfig(topk=topk, mode=mode, aug_per_sample=draws)
    limit = binom.ppf(1 - 1e-3 / b, draws, cfg.delta)  # per row, Bonferroni over rows
    out = carrot_augment(z, y, logits, w, cfg, generator=gen())
    assert out.z.shape[0] >= draws * b // 2
    m = margins64(z, y, w)
    kset = kset_of(mode, logits, y, w, min(topk, 59))[out.source]
    before = m[out.source].gather(1, kset)
    after = margins64(out.z, out.y, w).gather(1, kset)
    assert ((after - before).abs() <= 1e-4 * (1 + before.abs())).all()
    checks = [(out, w)]
    if mode == "class":
        aug = CarrotAugment(cfg)
        aug(z, y, logits, w, generator=gen())  # geometry cached from w
        w1 = w + 0.05 * torch.randn(w.shape, generator=gen(5))
        checks.append((aug(z, y, z @ w1.T, w1, generator=gen(2)), w1))
        assert aug.refresh_count == 1 and checks[-1][0].z.shape[0] > 0
    for res, weight in checks:
        after = margins64(res.z, res.y, weight)
        after.scatter_(1, res.y[:, None], float("inf"))
        bad = (after < cfg.gamma).any(dim=1).double().view(draws, -1).sum(dim=0)
        assert (bad <= limit).all(), bad


# --- class-covariance noise -----------------------------------------------------------------


def test_class_cov_noise_is_shaped_stays_in_nuisance_subspace_and_is_safe():
    torch.manual_seed(0)
    b, d, c, rank, draws = 8, 16, 12, 3, 2000
    z, y, w, logits = problem(b=b, d=d, c=c, seed=4)
    feats = torch.randn(400, d, generator=gen(2)) * torch.linspace(0.1, 2.0, d)
    labels = torch.randint(0, c, (400,), generator=gen(3))
    factor = class_factor_from_features(feats, labels, num_classes=c, rank=rank)
    assert factor.shape == (c, d, rank)
    cfg = CarrotConfig(topk=3, noise="class_cov", aug_per_sample=draws)
    out = carrot_augment(z, y, logits, w, cfg, generator=gen(), class_factor=factor)
    assert out.z.shape[0] > 0
    noise = (out.z - z[out.source]).double()
    kset = top_competitors(logits, y, 3)[out.source]
    diffs = w.double()[out.y][:, None, :] - w.double()[kset]
    assert (diffs @ noise[:, :, None]).abs().max() < 1e-5 * noise.norm(dim=1).max()
    # shaped: the noise of one row lies in span(P_N L_y) — rank ≤ r directions
    row = int(out.source[0])
    rows_noise = noise[out.source == row]
    assert torch.linalg.matrix_rank(rows_noise, rtol=1e-4) <= rank
    margins = margins64(out.z, out.y, w).scatter(1, out.y[:, None], 1.0)
    counts = (margins < 0).any(1).view(draws, -1).sum(0)  # per row: Binomial(draws, ≤ δ)
    assert int(counts.max()) <= binomial_upper(draws, 0.05, 1e-6 / counts.numel())


def test_class_factor_from_features_reproduces_the_covariance():
    feats = torch.randn(300, 6, generator=gen()) @ torch.randn(6, 6, generator=gen(2))
    labels = torch.zeros(300, dtype=torch.int64)
    factor = class_factor_from_features(feats, labels, num_classes=2, rank=6)
    cov = torch.cov(feats.T)
    assert torch.allclose(factor[0] @ factor[0].T, cov, atol=1e-4 * cov.abs().max())
    assert (factor[1] == 0).all()  # no samples: zero factor


# --- bf16 -----------------------------------------------------------------------------------


def test_bf16_features_work_with_float_geometry():
    z, y, w, logits = problem(dtype=torch.bfloat16, d=32, c=16)
    cfg = CarrotConfig(topk=3)
    out = carrot_augment(z, y, logits, w, cfg, generator=gen())
    ref = carrot_augment(z.float(), y, logits, w, cfg, generator=gen())
    assert out.z.dtype == torch.bfloat16 and out.z.shape[0] > 0
    assert torch.isfinite(out.z.float()).all()
    # the same α as the float32 computation on the same values, up to the bf16 rounding allowance
    assert torch.allclose(out.alpha, ref.alpha, rtol=0.05)
    assert torch.equal(out.source, ref.source)
    # the same noise direction (same generator), rounded to bf16
    noise, ref_noise = out.z.float() - z.float()[out.source], ref.z - z.float()[ref.source]
    assert (F.cosine_similarity(noise, ref_noise, dim=1) > 0.99).all()


# --- loss -----------------------------------------------------------------------------------


def test_carrot_loss_uses_w_directly_on_augmented_rows():
    z, y, w, logits = problem()
    out = carrot_augment(z, y, logits, w, CarrotConfig(topk=3), generator=gen())
    loss = carrot_loss(w, z, y, out, 0.5)
    expect = F.cross_entropy(z @ w.T, y) + 0.5 * F.cross_entropy(out.z @ w.T, out.y)
    assert torch.allclose(loss, expect)
    twice = F.cross_entropy(z @ w.T, y) + 0.5 * F.cross_entropy(
        F.layer_norm(out.z, (24,)) @ w.T, out.y
    )
    assert not torch.allclose(loss, twice)  # no second LayerNorm (seed defect 3)
    assert torch.allclose(carrot_loss(w, z, y, out, 0.5, logits=z @ w.T), loss)
    assert torch.allclose(carrot_loss(w, z, y, out, 0.0), F.cross_entropy(z @ w.T, y))


def test_training_step_runs_and_updates_layernorm():
    z_raw, y, w, _ = problem()
    ln, head = nn.LayerNorm(24), nn.Linear(24, 12, bias=False)
    with torch.no_grad():
        head.weight.copy_(0.5 * F.layer_norm(w, (24,)))
    opt = torch.optim.SGD([*ln.parameters(), *head.parameters()], lr=0.1)
    aug = CarrotAugment(CarrotConfig(topk=3, mode="class"))
    z = ln(z_raw)
    logits = head(z)
    out = aug(z, y, logits.detach(), head.weight, generator=gen())
    assert out.z.shape[0] > 0
    carrot_loss(head.weight, z, y, out, 1.0, logits=logits).backward()
    before = ln.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, ln.weight)


# --- pre-LN injection -----------------------------------------------------------------------


def _pre_ln_setup(seed=0):
    g = gen(seed)
    b, d, c = 12, 32, 16
    ln = nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        ln.bias.copy_(0.1 * torch.randn(d, generator=g))
    w = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    x = 3.0 + 2.0 * (2 * w[y] + 0.3 * torch.randn(b, d, generator=g))  # raw, un-normalized
    return x, y, w, ln


def test_pre_ln_is_first_order_exact_on_kset_margins():
    x, y, w, ln = _pre_ln_setup()
    x, ln = x.double(), ln.double()  # float64 so that rounding does not hide the second order
    logits = (ln(x) @ w.double().T).detach()
    kset = top_competitors(logits, y, 4)
    changes = {}
    for cap in (1e-2, 5e-3):
        cfg = CarrotConfig(topk=4, injection="pre_ln", alpha_max=cap)
        with torch.no_grad():
            out = carrot_augment_pre_ln(x, y, logits, w, ln, cfg, generator=gen())
            before = margins64(ln(x), y, w)[out.source]
            after = margins64(ln(out.z), out.y, w)
        assert out.z.shape[0] > 0
        ks = kset[out.source]
        outside = torch.ones_like(before, dtype=torch.bool).scatter_(1, ks, False)
        outside.scatter_(1, out.y[:, None], False)
        changes[cap] = (
            (after - before).gather(1, ks).abs().max().item(),
            (after - before)[outside].abs().median().item(),
        )
    (k_big, o_big), (k_small, o_small) = changes[1e-2], changes[5e-3]
    assert k_big < 0.1 * o_big  # Kset margins move far less than the others
    assert 3.0 < k_big / k_small < 5.0  # second order: halving the noise quarters the change
    assert 1.7 < o_big / o_small < 2.3  # first order elsewhere


def test_pre_ln_gradient_safety_and_module_dispatch():
    x, y, w, ln = _pre_ln_setup(seed=1)
    draws = 1000
    cfg = CarrotConfig(topk=4, injection="pre_ln", alpha_max=0.05, aug_per_sample=draws)
    xr = x.clone().requires_grad_(True)
    logits = (ln(x) @ w.T).detach()
    out = CarrotAugment(cfg)(xr, y, logits, w, generator=gen(), ln=ln)
    assert out.z.shape[0] > 0 and not out.alpha.requires_grad
    out.z.sum().backward()
    assert xr.grad.abs().sum() > 0
    margins = margins64(ln(out.z.detach()), out.y, w).scatter(1, out.y[:, None], 1.0)
    bad = int((margins < 0).any(1).sum())  # independent rows, each P ≤ δ: ≤ Binomial(M, δ)
    assert bad <= binomial_upper(out.z.shape[0], 0.05, 1e-6)
    with pytest.raises(ValueError, match="ln="):
        CarrotAugment(cfg)(x, y, logits, w)


# --- benchmark plumbing ---------------------------------------------------------------------


def test_step_benchmark_and_report_on_a_tiny_problem(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from benchmarks import _report, carrot_step

    result = carrot_step.run(quick=True, device="cpu", sizes={"B": 16, "D": 12, "C": 6, "K": 2})
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"plain", "carrot_class", "carrot_sample", "seed_loop"}
    assert rows["plain"]["ratio"] == 1.0 and all(row["median_ms"] > 0 for row in rows.values())
    assert (
        rows["carrot_class"]["frac_aug"] > 0
        and rows["carrot_class"]["target"] == carrot_step.TARGETS["carrot_class"]
    )
    path = tmp_path / "step.json"
    _report.write_report("tiny", result["rows"], json_path=path, extra={"sizes": result["sizes"]})
    record = json.loads(path.read_text())
    assert record["name"] == "tiny" and len(record["rows"]) == 4
    assert {"cpu", "torch_threads", "torch", "gpu"} <= set(record["machine"])
    assert "carrot_class" in capsys.readouterr().out
    assert _report.median_time(lambda: sum(range(100)), repeats=3, warmup=1) > 0


def test_wide_k_benchmark_rows_on_a_tiny_problem(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from benchmarks import carrot_step

    sizes = {"B": 8, "D": 6, "C": 12}
    result = carrot_step.run_wide_k("cpu", sizes=sizes, repeats=1, isolate=False)
    rows = result["rows"]
    assert [(r["variant"], r["K"]) for r in rows] == [
        ("wide_k_sample", 6),
        ("wide_k_sample", 11),
        ("wide_k_class", 6),
        ("wide_k_class", 11),
    ]
    assert all(r["median_ms"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert rows[0]["time_ratio"] == 1.0 and rows[1]["target"] == carrot_step.WIDE_K_TARGET
    assert carrot_step._rss_bytes() > 0


@given(
    groups=st.integers(1, 6),
    k=st.integers(1, 5),
    rows=st.integers(1, 12),
    copies=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_indexed_projection_equals_the_gathered_one(groups, k, rows, copies, dtype, seed):
    """The gather-free projection (sampled product + embedding_bag) is the gathered bmm one,
    for every row's own basis, copies of the rows, zero basis rows (rank-deficient) and dtypes."""
    g = torch.Generator().manual_seed(seed)
    d = k + 4
    basis = torch.linalg.qr(torch.randn(groups, d, k, generator=g, dtype=torch.float64))[0]
    basis = basis.transpose(1, 2).contiguous().to(dtype)  # (G, K, D) orthonormal rows
    basis[0, -1] = 0.0  # a dropped direction
    index = torch.randint(0, groups, (rows,), generator=g)
    v = torch.randn(copies, rows, d, generator=g, dtype=dtype)
    got = nuisance.project_out_indexed(basis, index, v)
    want = nuisance.project_out_explicit(basis.index_select(0, index), v)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert got.shape == v.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    q = basis.index_select(0, index)  # orthogonal to every row's own basis
    assert torch.einsum("nkd,and->ank", q, got).abs().max() < 10 * tol


@given(
    c=st.integers(3, 12),
    k=st.integers(1, 4),
    rows=st.integers(1, 10),
    copies=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_sampled_coefficient_projection_equals_the_dense_one(c, k, rows, copies, seed):
    """The float64 coefficient form with only each row's K + 1 products (sampled product +
    embedding_bag) is ``v − Aᵀ G⁺ A v`` with A the row's competitor differences, rank-deficient
    competitor sets (a duplicated class weight) included."""
    g = torch.Generator().manual_seed(seed)
    d = 2 * c
    k = min(k, c - 1)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    w[-1] = w[-2]  # collinear competitors
    wc = nuisance.centered_weight(w)
    y = torch.randint(0, c, (rows,), generator=g)
    logits = torch.randn(rows, c, generator=g)
    geo = nuisance.competitor_geometry(wc, wc @ wc.T, y, nuisance.top_competitors(logits, y, k))
    v = torch.randn(copies, rows, d, generator=g, dtype=torch.float64)
    got = nuisance.project_out(geo, v)
    a = wc[y][:, None, :] - wc[geo.kset]  # (N, K, D)
    dense = v - torch.einsum("nkd,nkj,anj->and", a, geo.pinv, torch.einsum("nkd,and->ank", a, v))
    torch.testing.assert_close(got, dense, atol=1e-10, rtol=0)


@given(
    c=st.integers(3, 12),
    k=st.integers(1, 4),
    rows=st.integers(1, 12),
    block=st.sampled_from([1, 7, 1 << 17]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_nuisance_variances_in_row_blocks_equal_the_dense_ones(c, k, rows, block, seed):
    """``competitor_geometry`` works through the (N, K, C) products in row blocks (one row, a
    few, all): every block size gives ``s_c`` = ``‖P_N d_c‖²`` of the dense projector, rounded
    up by at most ``ETA·‖d_c‖²``, for the classes outside the Kset (0 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    d = 2 * c
    k = min(k, c - 1)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    wc = nuisance.centered_weight(w)
    y = torch.randint(0, c, (rows,), generator=g)
    kset = nuisance.top_competitors(torch.randn(rows, c, generator=g), y, k)
    old = nuisance._SPAN_BLOCK_ELEMENTS
    nuisance._SPAN_BLOCK_ELEMENTS = block * k * c  # `block` rows per block
    try:
        geo = nuisance.competitor_geometry(wc, wc @ wc.T, y, kset)
    finally:
        nuisance._SPAN_BLOCK_ELEMENTS = old
    a = wc[y][:, None, :] - wc[kset]  # (N, K, D)
    diffs = wc[y][:, None, :] - wc[None, :, :]  # (N, C, D) d_c
    ad = torch.einsum("nkd,ncd->nck", a, diffs)  # A d_c
    p_s = torch.einsum("nck,nkj,ncj->nc", ad, geo.pinv, ad)  # ‖P_S d_c‖²
    exact = diffs.square().sum(-1) - p_s
    eta = nuisance.ETA_PER_COMPETITOR * k * diffs.square().sum(-1)
    out = geo.outside
    assert torch.all(geo.nuisance_var[~out] == 0)
    assert torch.all(geo.nuisance_var[out] >= exact[out] - 1e-9)
    assert torch.all(geo.nuisance_var[out] <= exact[out].clamp_min(0) + eta[out] + 1e-9)
