"""The rounding bounds that let CARROT skip products: margins read off logits the caller already
has (`linear_logits_error`, `HeadBank.logits_error`), float32 drift lengths
(`row_difference_sq_fast`), and the augmented logits as ``logits[source] + W·delta``.

Each bound is checked against float64 arithmetic on inputs built to stress it: large offsets
that cancel (a LayerNorm shift β against γ⊙x̂), rows that differ in their last bits, and
magnitudes from 1e-3 to 1e3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from pipeline.augment.carrot import (
    DRIFT_ANCHOR_CALLS,
    CarrotAugment,
    CarrotConfig,
    _stale_spread,
    carrot_augment,
    carrot_loss,
)
from pipeline.augment.nuisance import (
    Competitors,
    linear_logits_error,
    margin_slack,
    row_difference_sq,
    row_difference_sq_fast,
)
from pipeline.heads.bank import HeadBank

SIZES = st.tuples(st.integers(1, 40), st.integers(2, 300), st.integers(2, 30))
SCALES = st.sampled_from([1e-3, 1.0, 1e3])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=40, deadline=None)
@given(SIZES, SCALES, st.booleans(), st.integers(0, 2**16))
def test_linear_logits_error_bounds_the_float32_linear(sizes, scale, with_bias, seed):
    b, d, c = sizes
    g = _gen(seed)
    z = scale * torch.randn(b, d, generator=g) + scale * 50  # an offset: large terms cancel
    w = torch.randn(c, d, generator=g) / d**0.5
    bias = 10 * torch.randn(c, generator=g) if with_bias else None
    got = F.linear(z, w, bias).double()
    exact = z.double() @ w.double().T + (0 if bias is None else bias.double())
    err = linear_logits_error(z, w, bias)
    assert err is not None and err.shape == (b, c)
    assert ((got - exact).abs() <= err).all()
    assert (err <= 1e-3 * (z.double().norm(dim=1, keepdim=True) * w.double().norm(dim=1) + 1)).all()


def test_linear_logits_error_refuses_reduced_precision_matmul():
    z, w = torch.randn(4, 8), torch.randn(3, 8)
    assert linear_logits_error(z.bfloat16(), w.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_logits_error(z, w) is None
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert linear_logits_error(z, w) is None
    finally:
        torch.set_float32_matmul_precision(before)
    assert linear_logits_error(z, w) is not None


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), SIZES, SCALES, st.booleans(), st.integers(0, 2**16))
def test_bank_logits_error_bounds_the_fused_bank_logits(heads, sizes, scale, shared, seed):
    """``head_logits`` folds the LayerNorm affine into the matmul (x̂ (W⊙γ)ᵀ + W β + c), or with
    one frozen affine for every head (``shared``) computes z once (fl(z) Wᵀ + c): the bound
    holds against float64 ``W z + c`` of the very z the bank hands to CARROT, including a
    shift β that cancels most of γ⊙x̂."""
    b, d, c = sizes
    g = _gen(seed)
    bank = HeadBank(heads, d, c, seeds=list(range(heads)))
    rows = 1 if shared else heads
    with torch.no_grad():
        bank.weight.copy_(torch.randn(heads, c, d, generator=g))
        bank.bias.copy_(scale * torch.randn(heads, c, generator=g))
        bank.ln_weight.copy_(scale * (1 + torch.rand(rows, d, generator=g)).expand(heads, d))
        bank.ln_bias.copy_(-scale * 3 * torch.ones(heads, d))  # z = γ x̂ + β: large terms cancel
    bank.freeze_layer_norm(shared)
    assert bank._shared_affine() == shared
    x = torch.randn(b, d, generator=g) + 3
    idx = torch.arange(heads)
    with torch.no_grad():
        xhat = bank.normalize(x)
        logits = bank.head_logits(xhat).transpose(0, 1)  # (h, B, C)
        z = bank.group_features(xhat, idx)
    exact = (
        torch.einsum("hbd,hcd->hbc", z.double(), bank.weight.double())
        + bank.bias.double()[:, None, :]
    )
    err = bank.logits_error(xhat, z, idx)
    assert err is not None and err.shape == logits.shape
    assert ((logits.double() - exact).abs() <= err).all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(2, 400),
    st.integers(2, 30),
    SCALES,
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**16),
)
def test_fast_row_difference_never_underestimates(n, d, c, scale, dtype, seed):
    """float32 products with their allowance: ≥ the exact length (float64 rows: their own
    rounding to float32 included), and close to it. Some rows are copies of others plus
    last-bit noise: the subtraction cancels."""
    g = _gen(seed)
    w = scale * torch.randn(c, d, generator=g, dtype=torch.float64)
    w[c // 2 :] = w[: c - c // 2] * (1 + 1e-7 * torch.randn(c - c // 2, 1, generator=g).double())
    w = w.to(dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    w64 = w.double()
    exact = (w64[labels][:, None, :] - w64[None, :, :]).square().sum(-1)
    fast = row_difference_sq_fast(w, labels)
    assert (fast >= exact).all()
    norms = w64.norm(dim=1)
    scale_sq = (norms[labels][:, None] + norms[None, :]).square()
    assert (fast - exact <= 1e-3 * scale_sq).all()
    assert (row_difference_sq(w64, labels) >= exact).all()


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 30),
    st.integers(2, 200),
    SCALES,
    st.sampled_from([torch.float32, torch.float64]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_anchored_stale_spread_never_underestimates(c, d, scale, dtype, per_row, seed):
    """The spread bound ``√s_c⁰ + ‖Δ_y − Δ_c‖`` of a stale geometry, exact at an anchor call and
    grown by the triangle inequality in between (``_stale_spread`` with a workspace), is ≥ its
    float64 value at every call over two anchors and a change of source, for a class geometry
    seen through ``rows`` and for a per-row one; tight (within rounding) at the anchor calls,
    as is the stateless form there."""
    g = _gen(seed)
    n = 7 if per_row else c
    labels = torch.randint(0, c, (n,), generator=g) if per_row else torch.arange(c)
    s0 = scale**2 * torch.rand(n, c, generator=g, dtype=torch.float64)
    s0[torch.rand(n, c, generator=g) < 0.3] = 0.0  # Kset classes: s⁰ = 0
    rows = None if per_row else torch.randint(0, c, (9,), generator=g)
    source, other = torch.zeros(1), torch.zeros(1)

    def geometry(src: Tensor) -> Competitors:
        empty = torch.empty(0)
        return Competitors(labels, empty, None, empty, s0, empty, empty, source=src)

    drift = scale * torch.randn(c, d, generator=g, dtype=torch.float64)
    origin = (10 * scale * torch.randn(c, d, generator=g)).to(dtype)  # the source weight
    workspace: dict = {}
    seen = labels if rows is None else labels[rows]
    for call in range(2 * DRIFT_ANCHOR_CALLS + 3):
        step = 10.0 ** -int(torch.randint(0, 4, (), generator=g)) * scale
        drift = drift + step * torch.randn(c, d, generator=g, dtype=torch.float64)
        geo = geometry(source if call < 2 * DRIFT_ANCHOR_CALLS else other)  # then a refresh
        position = (origin.double() + drift).to(dtype)  # the current weight
        got = _stale_spread(position, origin, geo, rows, workspace)
        d64 = position.double() - origin.double()
        moved = (d64[seen][:, None, :] - d64[None, :, :]).square().sum(-1).sqrt()
        exact = (s0 if rows is None else s0[rows]).sqrt() + moved
        assert (got >= exact).all(), call
        if call % DRIFT_ANCHOR_CALLS == 0 or call == 2 * DRIFT_ANCHOR_CALLS:  # an anchor
            norms = d64.norm(dim=1)
            room = 0.04 * (norms[seen][:, None] + norms[None, :]) + 1e-12 * exact
            stateless = _stale_spread(position, origin, geo, rows, None)
            for bound in (got, stateless):
                assert (bound >= exact).all() and (bound - exact <= room).all(), call
    assert workspace["drift_anchor"]["source"] is other


def test_margins_read_off_logits_are_no_larger_than_exact():
    """With the logits' error bound, the slack is a lower bound on the float64 margin − γ and
    within the bound of the recomputed slack."""
    g = _gen(1)
    b, d, c = 64, 96, 12
    z = torch.randn(b, d, generator=g) * 4 + 2
    w = torch.randn(c, d, generator=g)
    bias = torch.randn(c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    logits = F.linear(z, w, bias)
    read = margin_slack(
        z, y, w, 0.1, z.dtype, bias, logits=logits, logits_error=linear_logits_error(z, w, bias)
    )
    again = margin_slack(z, y, w, 0.1, z.dtype, bias)
    exact64 = z.double() @ w.double().T + bias.double()
    exact = exact64.gather(1, y[:, None]) - exact64 - 0.1
    off = ~torch.nn.functional.one_hot(y, c).bool()
    assert (read[off] <= exact[off]).all() and (again[off] <= exact[off]).all()
    assert torch.allclose(read, again, rtol=0, atol=1e-3)
    assert torch.isinf(read[~off]).all()


@pytest.mark.parametrize("mode", ["class", "sample"])
def test_logit_shift_loss_matches_the_augmented_rows_loss(mode):
    """``logits[source] + W·delta`` gives ``CE(W z̃ + b)`` and its gradients (weight, bias,
    LayerNorm), and the violation rate recorded from it equals the one measured on z̃."""
    g = _gen(2)
    b, d, c = 48, 32, 10
    x = torch.randn(b, d, generator=g) + 1
    y = torch.randint(0, c, (b,), generator=g)
    grads, rates = [], []
    for shifted in (True, False):
        ln, head = torch.nn.LayerNorm(d), torch.nn.Linear(d, c)
        torch.manual_seed(0)
        with torch.no_grad():
            head.weight.copy_(torch.randn(c, d, generator=_gen(3)))
            head.bias.copy_(torch.randn(c, generator=_gen(4)))
        z = ln(x)
        logits = head(z)
        cfg = CarrotConfig(topk=3, mode=mode)
        err = linear_logits_error(z, head.weight, head.bias)
        out = CarrotAugment(cfg)(
            z,
            y,
            logits,
            head.weight,
            generator=_gen(5),
            bias=head.bias,
            logits_error=err,
            measure=not shifted,
        )
        if not shifted:
            out.delta = None  # the W z̃ path
        loss = carrot_loss(head.weight, z, y, out, 1.0, logits=logits, bias=head.bias)
        loss.backward()
        grads.append([p.grad.clone() for p in (*ln.parameters(), *head.parameters())])
        rates.append(float(out.diagnostics["violation_rate"]))
        assert out.z.shape[0] > 0
    for a, bb in zip(*grads, strict=True):
        assert torch.allclose(a, bb, atol=1e-5, rtol=1e-4)
    assert rates[0] == rates[1]


def test_margins_from_logits_change_no_augmentation_decision():
    """Reading margins off the logits (with their bound) and recomputing them give the same
    augmented rows and labels on a typical batch."""
    g = _gen(6)
    b, d, c = 128, 64, 20
    z = F.layer_norm(torch.randn(b, d, generator=g), (d,))
    w = 0.5 * torch.randn(c, d, generator=g)
    y = (z @ w.T).argmax(1)
    logits = z @ w.T
    cfg = CarrotConfig(topk=4)
    fast = carrot_augment(
        z, y, logits, w, cfg, generator=_gen(7), logits_error=linear_logits_error(z, w)
    )
    slow = carrot_augment(z, y, logits, w, cfg, generator=_gen(7))
    assert torch.equal(fast.source, slow.source)
    assert torch.allclose(fast.z, slow.z, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "duplicate", "collinear", "tiny"])
def test_cholesky_whitening_spans_what_eigh_spans(kind):
    """The Cholesky fast path keeps exactly the directions eigh keeps: same rank, the same
    projector ``Aᵀ G⁺ A`` and orthonormal whitened rows; degenerate rows fall back to eigh."""
    from pipeline.augment.nuisance import RTOL, _whitening

    g = _gen(8)
    n, k, d = 32, 6, 20
    a = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    if kind == "duplicate":
        a[::2, 1] = a[::2, 0]
    elif kind == "collinear":
        a[::2, 2] = a[::2, 0] + 1e-7 * a[::2, 1]  # condition ~1e14: below RTOL, dropped
    elif kind == "tiny":
        a[::3] *= 1e-150
    gram = a @ a.transpose(1, 2)
    whiten, rank, condition = _whitening(gram)
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > RTOL * lam[:, -1:].clamp_min(0)
    assert torch.equal(rank, keep.sum(1))
    inv_sqrt = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), 0.0)
    ref = vec * inv_sqrt[:, None, :]
    proj = a.transpose(1, 2) @ (whiten @ whiten.transpose(1, 2)) @ a
    proj_ref = a.transpose(1, 2) @ (ref @ ref.transpose(1, 2)) @ a
    assert torch.allclose(proj, proj_ref, atol=1e-6)
    q = whiten.transpose(1, 2) @ a
    qq = q @ q.transpose(1, 2)  # orthonormal rows (and zero rows for dropped directions)
    assert torch.allclose(qq @ qq, qq, atol=1e-6)
    assert torch.allclose(qq.diagonal(dim1=1, dim2=2).sum(1), rank.double(), atol=1e-6)
    assert (condition >= 1).all()
