"""The short-class-axis log-softmax: torch's values and gradients, spread logits included; the
heads' cross-entropy with and without label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.heads.softmax import SHORT_CLASSES, log_softmax
from pipeline.heads.train import cross_entropy


@settings(deadline=None, max_examples=60)
@given(
    rows=st.integers(1, 40),
    heads=st.integers(1, 4),
    classes=st.integers(1, SHORT_CLASSES + 4),
    scale=st.sampled_from([0.1, 3.0, 300.0, 3e4]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_equals_torch_in_value_and_gradient(rows, heads, classes, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, heads, classes, generator=g, dtype=dtype) * scale).requires_grad_()
    w = torch.randn(rows, heads, classes, generator=g, dtype=dtype)
    got, want = log_softmax(x), F.log_softmax(x, dim=-1)
    assert got.dtype == dtype and got.shape == want.shape
    (g_got,) = torch.autograd.grad((got * w).sum(), x)
    (g_want,) = torch.autograd.grad((want * w).sum(), x)
    tol = {"rtol": 1e-5, "atol": 1e-5 * max(1.0, scale)} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(g_got, g_want, **tol)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 4),
    st.integers(2, 30),
    st.booleans(),
    st.sampled_from([0.1, 3.0, 300.0]),
    st.integers(0, 2**16),
)
def test_cross_entropy_without_smoothing_equals_zero_smoothing(m, h, c, masked, scale, seed):
    """``smoothing=None`` (no head smooths) gives the very loss and logit gradient of zero
    smoothing, bit for bit, and the smoothed loss matches ``F.cross_entropy`` per head."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(m, h, c, generator=g)
    y = torch.randint(0, c, (m,), generator=g)
    mask = torch.rand(m, h, generator=g) < 0.7 if masked else None
    grads = []
    for smoothing in (torch.zeros(h), None):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, y, smoothing, mask=mask)
        (loss * torch.arange(1.0, h + 1)).sum().backward()
        grads.append((loss.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    smooth = torch.linspace(0.0, 0.3, h)
    ours = cross_entropy(logits, y, smooth)
    for i in range(h):
        ref = F.cross_entropy(logits[:, i], y, label_smoothing=float(smooth[i]))
        torch.testing.assert_close(ours[i], ref, rtol=1e-5, atol=1e-5)
