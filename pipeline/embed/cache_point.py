"""Caching at a block boundary (``carrot embed --cache-at block:-N``): the tokens that enter the
last N blocks of a ViT, so stage 2 can train those blocks (and the final norm and pooling)
without running the frozen trunk again.

The store keeps each image's tokens flattened, ``(T·D,)`` per row (the store's ``dim``), with
``(T, D)`` recorded in its identity (``extra["tokens"]``); prefix tokens (class, registers)
first, then the patch tokens, in timm's NLC order. `model_top` rebuilds what runs on them:
``forward_head(norm(blocks[-N:](tokens)), pre_logits=True)``, which equals the model's own
pooled embedding (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.errors import InputError

CHUNK_BYTES = 64 << 20
"""Target bytes per store chunk for token caches (a chunk is the unit of work and resume)."""


def parse_cache_at(text: str | None) -> int:
    """``"block:-N"`` → N (≥ 1); None or ``""`` → 0 (pooled embeddings). `InputError` else."""
    if not text:
        return 0
    head, _, count = text.partition(":-")
    if head == "block" and count.isdigit() and int(count) >= 1:
        return int(count)
    raise InputError(
        f"--cache-at {text!r}: use block:-N (N ≥ 1: cache the tokens entering the last N blocks)"
    )


def check_cache_model(model: torch.nn.Module, blocks: int, name: str) -> None:
    """`InputError` unless ``model`` is a ViT-style model with more than ``blocks`` blocks."""
    depth = len(getattr(model, "blocks", ()))
    if not (depth and hasattr(model, "forward_intermediates") and hasattr(model, "forward_head")):
        raise InputError(
            f"--cache-at block:-{blocks}: {name!r} is not a ViT-style model with a block list; "
            "use a ViT (e.g. test_vit, vit_small_patch14_dinov2)"
        )
    if blocks >= depth:
        raise InputError(
            f"--cache-at block:-{blocks}: {name!r} has {depth} blocks; cache at most block:-"
            f"{depth - 1} (the trunk must keep one)"
        )


def cached_tokens(model: torch.nn.Module, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """The tokens entering the last ``blocks`` blocks: (B, 3, H, W) → (B, T, D)."""
    depth = len(model.blocks)
    (patches, prefix), *_ = model.forward_intermediates(
        x,
        indices=[depth - blocks - 1],
        return_prefix_tokens=True,
        norm=False,
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    return torch.cat([prefix, patches], dim=1)


def model_top(model: torch.nn.Module, blocks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs on cached tokens: (B, T, D) → (B, D') pooled embedding, through the model's
    own last ``blocks`` blocks, final norm and pooling (the same parameters, not copies)."""
    top = model.blocks[-blocks:]

    def run(tokens: torch.Tensor) -> torch.Tensor:
        for block in top:
            tokens = block(tokens)
        return model.forward_head(model.norm(tokens), pre_logits=True)

    return run


def chunk_rows_for(row_values: int, itemsize: int) -> int:
    """Rows per chunk so a chunk holds about `CHUNK_BYTES` (at least 1, at most the store's
    default chunk rows)."""
    from stores.schema import DEFAULT_CHUNK_ROWS

    return max(1, min(DEFAULT_CHUNK_ROWS, CHUNK_BYTES // max(1, row_values * itemsize)))
