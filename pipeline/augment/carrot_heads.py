"""CARROT for a group of heads at once: one geometry over stacked weights, one projection.

:func:`carrot_augment` serves one head (C, D); a head bank trains many heads with the same
CARROT settings over the same batch, and per call each head pays a few milliseconds of small-op
overhead whatever its size. :func:`carrot_augment_heads` runs the "sample"-mode, isotropic,
post-LN path for H heads as one problem of H·B rows: row ``h·B + i`` is sample i seen by head h,
with head-local labels and competitors and its head's rows of the stacked weight (H·C, D). The
math per row is exactly :func:`carrot_augment`'s (same Kset, projector, slack and chance bound);
each head draws from its own generator, as it would alone.
Shapes: H heads, B rows, D features, C classes, K = min(topk, C − 1), a = aug_per_sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.augment.carrot import DEFAULT_RELATIVE_CAP, CarrotConfig
from pipeline.augment.nuisance import (
    cap_alpha,
    centered_weight,
    centred_span_basis,
    chance_alpha,
    competitor_geometry,
    margin_slack,
    project_out,
    tail_quantile_sq,
    top_competitors,
    workspace_buffer,
)

__all__ = ["HeadsOutput", "carrot_augment_heads", "supports_heads"]


@dataclass
class HeadsOutput:
    """Every head's noise for every row, unaugmented rows zero. ``delta`` (H, a·B, D) detached,
    copies stacked copy-major (row ``j·B + i`` is copy j of sample i), in z's dtype;
    ``augmented`` (H, a·B) bool, the rows with α > 0; ``alpha`` (H, B) float32; ``diagnostics``
    (H,) float32 per key (``frac_augmented``, ``median_alpha``, ``median_noise_ratio``: medians
    over each head's augmented rows, 0 when none); ``gamma`` the margin floor."""

    delta: Tensor
    augmented: Tensor
    alpha: Tensor
    diagnostics: dict[str, Tensor]
    gamma: float


def supports_heads(cfg: CarrotConfig, dim: int, num_classes: int) -> bool:
    """Whether :func:`carrot_augment_heads` covers ``cfg`` for heads of ``dim`` features and
    ``num_classes`` classes: "sample" mode, isotropic post-LN noise, K < D (or every class
    competing). The other settings run :func:`carrot_augment` head by head."""
    k = min(cfg.topk, num_classes - 1)
    return (
        cfg.mode == "sample"
        and cfg.noise == "isotropic"
        and cfg.injection == "post_ln"
        and (k < dim or k == num_classes - 1)
    )


@torch.no_grad()
def carrot_augment_heads(
    z: Tensor,
    y: Tensor,
    logits: Tensor,
    weight: Tensor,
    cfg: CarrotConfig,
    *,
    logits_error: Tensor,
    generators: Sequence[torch.Generator] | None = None,
    workspace: dict | None = None,
) -> HeadsOutput:
    """CARROT noise for post-LN features ``z`` (H, B, D) of H heads with weights ``weight``
    (H, C, D), shared labels ``y`` (B,), and each head's ``logits`` (H, B, C) ≈ ``W_h z_h + b_h``
    (biases included) within ``logits_error`` (broadcastable to (H, B, C); see
    :func:`~pipeline.augment.nuisance.linear_logits_error`): margins are read off them.

    The augmented logits are ``logits + W_h·delta`` (no gradient flows through ``delta``).
    Head h draws its noise from ``generators[h]`` (the very draw :func:`carrot_augment` makes
    with it), so a head's result does not depend on the other heads of the call. ``workspace``:
    a dict the caller keeps, to reuse the draws' buffers between calls.
    Per call: O(H·C²·D) for the Grams plus O(H·B·(K+1)·D).
    """
    h, b, d = z.shape
    c = weight.shape[1]
    if not supports_heads(cfg, d, c):
        raise ValueError("carrot_augment_heads covers sample mode, isotropic post-LN noise only")
    if weight.shape != (h, c, d) or logits.shape != (h, b, c) or y.shape != (b,):
        raise ValueError(
            f"need z (H, B, D), y (B,), logits (H, B, C), weight (H, C, D); got "
            f"{tuple(z.shape)}, {tuple(y.shape)}, {tuple(logits.shape)}, {tuple(weight.shape)}"
        )
    n = h * b
    heads = torch.arange(h, device=z.device).repeat_interleave(b)  # (N,) head of each row
    labels = y.repeat(h)  # (N,) head-local
    zf = z.reshape(n, d)
    wc = centered_weight(weight)  # (H, C, D) centred per head
    k = min(cfg.topk, c - 1)
    z_norm32 = torch.linalg.vector_norm(zf.float(), dim=1)  # (N,): margins, cap, diagnostics
    slack = margin_slack(
        zf,
        labels,
        weight,
        cfg.gamma,
        z.dtype,
        logits=logits.reshape(n, c),
        logits_error=torch.broadcast_to(logits_error, (h, b, c)).reshape(n, c),
        row_heads=heads,
        z_norm=z_norm32,
    )
    base = _draws(generators, h, (cfg.aug_per_sample, b, d), z.device, workspace)  # (a, N, D)
    if k == c - 1:  # every other class competes: one basis per head, nothing outside
        basis, rank = centred_span_basis(wc)  # (H, R, D), (H,)
        rows = base.view(-1, h, b, d)
        noise = rows - (rows @ basis.transpose(1, 2)) @ basis
        alpha = torch.full((n,), math.inf, dtype=torch.float64, device=z.device)
        rank = rank.index_select(0, heads)
        n_out = 0
    else:
        offsets = heads * c
        gram = torch.bmm(wc, wc.transpose(1, 2)).view(h * c, c)  # stacked (H·C, C)
        kset = top_competitors(logits.reshape(n, c), labels, k)
        geo = competitor_geometry(wc.view(h * c, d), gram, labels, kset, offsets=offsets)
        n_out = c - 1 - k
        q2 = tail_quantile_sq(cfg.delta, n_out, cfg.quantile) if n_out else math.inf
        alpha = chance_alpha(slack, geo.nuisance_var, geo.outside, n_out=n_out, q2=q2)
        noise = project_out(geo, base)  # (a, N, D)
        rank = geo.rank
    eligible = (slack > 0).all(dim=1) & (rank < d)
    noise = noise.reshape(-1, n, d).to(torch.promote_types(z.dtype, torch.float32))
    default = DEFAULT_RELATIVE_CAP if n_out == 0 else None
    cap = cfg.alpha_max if cfg.alpha_max is not None else default
    z_norm = z_norm32.double()
    alpha = cap_alpha(alpha, eligible, noise, z_norm, cap)  # (N,)
    delta = noise.mul_(alpha.sqrt().to(noise.dtype)[None, :, None]).to(z.dtype)  # (a, N, D)
    delta = delta.view(-1, h, b, d).transpose(0, 1).reshape(h, -1, d)  # (H, a·B, D)
    on = (alpha > 0).view(h, b)
    augmented = on.repeat(1, cfg.aug_per_sample)  # (H, a·B)
    z_norm_hb = z_norm32.clamp_min(1e-30).view(h, b).repeat(1, cfg.aug_per_sample)
    ratio = delta.float().norm(dim=-1) / z_norm_hb  # (H, a·B) ‖z̃ − z‖/‖z‖
    alpha_hb = alpha.view(h, b)
    diagnostics = {
        "frac_augmented": on.float().mean(dim=1),
        "median_alpha": _masked_median(alpha_hb.float(), on),
        "median_noise_ratio": _masked_median(ratio, augmented),
    }
    return HeadsOutput(delta, augmented, alpha_hb.float(), diagnostics, cfg.gamma)


def _draws(
    generators: Sequence[torch.Generator] | None,
    h: int,
    shape: tuple,
    device: torch.device,
    workspace: dict | None,
) -> Tensor:
    """(a, H·B, D) float64 standard normal draws, head h's block from ``generators[h]``
    (scratch in ``workspace`` buffers when given)."""
    if generators is not None and len(generators) != h:
        raise ValueError(f"need one generator per head ({h}), got {len(generators)}")
    out = workspace_buffer(workspace, "draws", (h, *shape), torch.float32, torch.device(device))
    out = torch.empty((h, *shape), device=device) if out is None else out
    for i in range(h):
        torch.randn(shape, generator=None if generators is None else generators[i], out=out[i])
    a, b, d = shape
    draws = out.transpose(0, 1).reshape(a, h * b, d)
    wide = workspace_buffer(workspace, "draws_wide", draws.shape, torch.float64, draws.device)
    return draws.to(torch.float64) if wide is None else wide.copy_(draws)


def _masked_median(values: Tensor, mask: Tensor) -> Tensor:
    """(H,) lower median of each row of ``values`` (H, M) over its True ``mask`` entries; 0 where
    there are none (as :func:`torch.median` of the augmented rows, head by head)."""
    kept = torch.where(mask, values, torch.nan)
    return torch.nanmedian(kept, dim=1).values.nan_to_num(nan=0.0)
