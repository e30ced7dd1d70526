"""What stage 1 stores per image: the model's pooled pre-logits, or DINOv2's linear-probe input.

``--features`` modes:

* ``pooled`` (default) — ``model(x)`` with ``num_classes=0``: timm's pooled pre-logits, (B, D);
* ``last:N`` — DINOv2's linear evaluation input (``eval/linear.py``: ``n_last_blocks`` class
  tokens plus the average-pooled patch tokens): the class token of each of the last N blocks
  and the mean of the last block's patch tokens, every block output passed through the model's
  final norm (``forward_intermediates(norm=True)``), concatenated, (B, (N + 1)·D);
* ``cls+avgpool`` — the same as ``last:1``, (B, 2·D).

Token modes need a model with a class token and ``forward_intermediates`` (timm's ViT family);
register and distillation tokens are left out of the patch mean.
"""

from __future__ import annotations

import torch

from pipeline.errors import InputError

POOLED = "pooled"


def last_blocks(mode: str) -> int:
    """Blocks whose class token a mode takes: 0 for ``pooled``, N for ``last:N``, 1 for
    ``cls+avgpool``. `InputError` naming ``--features`` for anything else."""
    if mode == POOLED:
        return 0
    if mode == "cls+avgpool":
        return 1
    head, _, count = mode.partition(":")
    if head == "last" and count.isascii() and count.isdigit() and int(count) >= 1:
        return int(count)
    raise InputError(
        f"--features {mode!r}: use pooled, cls+avgpool, or last:N (N ≥ 1: the class tokens of "
        "the last N blocks plus the mean patch token, as DINOv2's linear evaluation)"
    )


def check_model(model: torch.nn.Module, mode: str, name: str) -> None:
    """`InputError` unless ``model`` (timm model ``name``) can give ``mode``'s features."""
    n = last_blocks(mode)
    if n == 0:
        return
    has_cls = getattr(model, "cls_token", None) is not None
    if not (has_cls and hasattr(model, "forward_intermediates")):
        raise InputError(
            f"--features {mode}: {name!r} has no class token; token features need a ViT with "
            "one (e.g. vit_small_patch14_dinov2, test_vit), or use --features pooled"
        )
    depth = len(getattr(model, "blocks", ()))
    if depth and n > depth:
        raise InputError(f"--features {mode}: {name!r} has only {depth} blocks; use last:{depth}")


def embed(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Features of ``mode`` for a normalized batch (B, 3, H, W) → (B, D') (see the module)."""
    n = last_blocks(mode)
    if n == 0:
        return model(x)
    blocks = model.forward_intermediates(
        x,
        indices=n,
        return_prefix_tokens=True,
        norm=True,
        output_fmt="NLC",
        intermediates_only=True,
    )  # n × (patch tokens (B, T, D), prefix tokens (B, P, D)), oldest block first
    cls = [prefix[:, 0] for _, prefix in blocks]
    patches = blocks[-1][0]
    return torch.cat([*cls, patches.mean(dim=1)], dim=-1)
