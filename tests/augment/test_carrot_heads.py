"""CARROT batched across heads (pipeline.augment.carrot_heads) against head-by-head CARROT:
the same α, the same noise given the same draws, the same diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.augment.carrot import CarrotConfig, carrot_augment
from pipeline.augment.carrot_heads import carrot_augment_heads, supports_heads
from pipeline.augment.nuisance import linear_logits_error


def heads_problem(h: int, b: int, d: int, c: int, seed: int):
    """H heads over the same labels; z_h = 2·w_{h,y} + noise, so most margins are positive."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, c, d, generator=g)
    bias = 0.1 * torch.randn(h, c, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    z = 2.0 * w[:, y] + 0.4 * torch.randn(h, b, d, generator=g)  # (H, B, D)
    logits = torch.stack([F.linear(z[i], w[i], bias[i]) for i in range(h)])
    err = torch.stack([linear_logits_error(z[i], w[i], bias[i]) for i in range(h)])
    return z, y, w, bias, logits, err


def generators(h: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(h)]


def one_by_one(z, y, w, bias, logits, err, cfg, seed):
    """Head-by-head `carrot_augment`, head i drawing from its own generator."""
    gens = generators(z.shape[0], seed)
    return [
        carrot_augment(
            z[i],
            y,
            logits[i],
            w[i],
            cfg,
            generator=gens[i],
            bias=bias[i],
            logits_error=err[i],
            measure=False,
        )
        for i in range(z.shape[0])
    ]


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 4),
    b=st.sampled_from([4, 16, 32]),
    d=st.sampled_from([8, 16, 32]),  # 8 < C: the shared basis from the D×D form
    c=st.integers(3, 12),
    topk=st.integers(1, 12),
    alpha_max=st.sampled_from([None, 0.5]),
    copies=st.integers(1, 2),
    seed=st.integers(0, 10_000),
)
def test_heads_batch_equals_head_by_head(h, b, d, c, topk, alpha_max, copies, seed):
    cfg = CarrotConfig(
        topk=topk, alpha_max=alpha_max, delta=0.05, gamma=0.05, aug_per_sample=copies
    )
    assume(supports_heads(cfg, d, c))
    z, y, w, bias, logits, err = heads_problem(h, b, d, c, seed)
    single = one_by_one(z, y, w, bias, logits, err, cfg, seed + 1)
    out = carrot_augment_heads(
        z, y, logits, w, cfg, logits_error=err, generators=generators(h, seed + 1)
    )
    for i, ref in enumerate(single):
        torch.testing.assert_close(out.alpha[i], ref.alpha, rtol=1e-6, atol=0)
        on = torch.nonzero(ref.alpha > 0).squeeze(1)
        rows = (torch.arange(copies)[:, None] * b + on).reshape(-1)  # copy-major, as ref's
        assert torch.equal(torch.nonzero(out.augmented[i]).squeeze(1), rows)
        torch.testing.assert_close(out.delta[i, rows], ref.delta, rtol=1e-5, atol=1e-6)
        assert not out.delta[i, ~out.augmented[i]].any()  # unaugmented rows carry no noise
        for key in ("frac_augmented", "median_alpha", "median_noise_ratio"):
            torch.testing.assert_close(
                out.diagnostics[key][i], ref.diagnostics[key].float(), rtol=1e-5, atol=1e-7
            )


def test_heads_batch_keeps_every_kset_margin():
    """The guarantee itself, on the batched output: each head's noise leaves the margins
    against its own top-K competitors unchanged (to rounding)."""
    cfg = CarrotConfig(topk=3)
    z, y, w, _bias, logits, err = heads_problem(3, 64, 32, 10, seed=7)
    out = carrot_augment_heads(z, y, logits, w, cfg, logits_error=err, generators=generators(3, 0))
    assert out.augmented.any(dim=1).all()  # every head augments some rows
    for i in range(3):
        moved = out.delta[i].double() @ w[i].double().T  # (B, C) change of each logit
        masked = logits[i].clone()
        masked.scatter_(1, y[:, None], float("-inf"))
        kset = masked.topk(3, dim=1).indices
        change = moved.gather(1, y[:, None]) - moved.gather(1, kset)  # (B, K) margin change
        assert change[out.augmented[i]].abs().max() < 1e-4
        assert moved[out.augmented[i]].abs().max() > 1e-2  # while the noise is not zero


def test_supports_heads_names_the_covered_settings():
    assert supports_heads(CarrotConfig(), dim=32, num_classes=20)
    assert supports_heads(CarrotConfig(topk=50), dim=8, num_classes=20)  # every class: shared
    assert not supports_heads(CarrotConfig(topk=12), dim=8, num_classes=20)  # K ≥ D
    assert not supports_heads(CarrotConfig(mode="class"), dim=32, num_classes=20)
    assert not supports_heads(CarrotConfig(injection="pre_ln"), dim=32, num_classes=20)
    with pytest.raises(ValueError, match="sample mode"):
        z, y, w, _, logits, err = heads_problem(2, 8, 16, 5, seed=0)
        carrot_augment_heads(z, y, logits, w, CarrotConfig(mode="class"), logits_error=err)
