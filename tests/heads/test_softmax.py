"""The short-class-axis log-softmax: torch's values and gradients, spread logits included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.heads.softmax import SHORT_CLASSES, log_softmax


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
