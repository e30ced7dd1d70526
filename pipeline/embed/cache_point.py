"""Caching at a block boundary (``carrot embed --cache-at block:-N``): the activations that
enter the last N blocks, so stage 2 can train those blocks (and the final norms and pooling)
without running the frozen trunk again.

What a "block" is follows timm's ``forward_intermediates``, which works across families:

- ViTs (``blocks``, ``norm``): one transformer block. The cache holds the tokens ``(T, D)`` in
  NLC order, prefix tokens (class, registers) first, then the patch tokens; the store records
  ``extra["tokens"] = [T, D]``.
- ResNets (``layer1`` … ``layer4``) and ConvNeXts (``stages``): one stage, the granularity of
  their ``feature_info``. The cache holds the feature map ``(C, H, W)`` (NCHW) of the stage
  before; the store records ``extra["feature_map"] = [C, H, W]``.

Each row is stored flattened (the store's ``dim`` is the product). `model_top` rebuilds what runs
on a cached row: the last N blocks, the final norm, ``forward_head(pre_logits=True)`` — which
equals the model's own pooled embedding (tested for each family).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import InputError

CHUNK_BYTES = 64 << 20
"""Target bytes per store chunk for activation caches (a chunk is the unit of work and resume)."""

FAMILIES = "a ViT (test_vit, vit_small_patch14_dinov2), a ResNet (resnet18) or a ConvNeXt"


@dataclass(frozen=True)
class CacheLayout:
    """Where a model can be cut: its blocks in forward order and what follows them.

    ``units`` are module names (``blocks.3``, ``layer4``, ``stages.2``); ``feature_index[i]`` is
    the ``forward_intermediates`` index of unit i's output; ``tail`` runs after the last unit
    inside ``forward_features`` (``norm``, ``norm_pre``; None: nothing); ``head_norms`` are the
    modules of ``forward_head``'s pooling that train with the top."""

    family: str  # vit | resnet | convnext
    units: tuple[str, ...]
    feature_index: tuple[int, ...]
    tail: str | None
    head_norms: tuple[str, ...]

    @property
    def row_key(self) -> str:
        """The store identity's key for a row's shape: ``tokens`` or ``feature_map``."""
        return "tokens" if self.family == "vit" else "feature_map"


def layout_of(model: nn.Module) -> CacheLayout | None:
    """The model's `CacheLayout`, or None for a family this module does not know."""
    if not hasattr(model, "forward_intermediates"):
        return None
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(model, "norm"):
        if not hasattr(model, "forward_head") or not hasattr(model, "num_prefix_tokens"):
            return None
        pools = ("fc_norm", "attn_pool")
        return CacheLayout(
            family="vit",
            units=tuple(f"blocks.{i}" for i in range(len(blocks))),
            feature_index=tuple(range(len(blocks))),
            tail="norm",
            head_norms=tuple(n for n in pools if isinstance(getattr(model, n, None), nn.Module)),
        )
    names = [str(f["module"]) for f in getattr(model, "feature_info", ())]
    kind = type(model).__name__
    if kind == "ResNet":
        units = tuple(n for n in names if n.startswith("layer"))
        return CacheLayout("resnet", units, tuple(names.index(u) for u in units), None, ())
    if kind == "ConvNeXt":
        units = tuple(n for n in names if n.startswith("stages."))
        return CacheLayout(
            "convnext", units, tuple(names.index(u) for u in units), "norm_pre", ("head.norm",)
        )
    return None


def parse_cache_at(text: str | None) -> int:
    """``"block:-N"`` → N (≥ 1); None or ``""`` → 0 (pooled embeddings). `InputError` else."""
    if not text:
        return 0
    head, _, count = text.partition(":-")
    if head == "block" and count.isascii() and count.isdigit() and int(count) >= 1:
        return int(count)
    raise InputError(
        f"--cache-at {text!r}: use block:-N (N ≥ 1: cache the activations entering the last N "
        "blocks)"
    )


def check_cache_model(model: nn.Module, blocks: int, name: str) -> CacheLayout:
    """The model's layout; `InputError` for another family or ``blocks`` ≥ its block count."""
    layout = layout_of(model)
    if layout is None:
        raise InputError(
            f"--cache-at block:-{blocks}: {name!r} ({type(model).__name__}) is not a family whose "
            f"blocks carrot can cut; use {FAMILIES}"
        )
    depth = len(layout.units)
    if blocks >= depth:
        unit = "blocks" if layout.family == "vit" else "stages"
        raise InputError(
            f"--cache-at block:-{blocks}: {name!r} has {depth} {unit}; cache at most block:-"
            f"{depth - 1} (the trunk must keep one)"
        )
    return layout


def cached_activations(model: nn.Module, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """What enters the last ``blocks`` blocks: (B, 3, H, W) → (B, T, D) tokens (ViT) or
    (B, C, H', W') feature map (ConvNet)."""
    layout = check_cache_model(model, blocks, type(model).__name__)
    index = layout.feature_index[-blocks - 1]
    common = {"indices": [index], "stop_early": True, "intermediates_only": True}
    if layout.family == "vit":
        (patches, prefix), *_ = model.forward_intermediates(
            x, return_prefix_tokens=True, norm=False, output_fmt="NLC", **common
        )
        return torch.cat([prefix, patches], dim=1)
    (feature_map,) = model.forward_intermediates(x, **common)
    return feature_map


def top_blocks(model: nn.Module, blocks: int) -> list[nn.Module]:
    """The model's last ``blocks`` blocks (ViT blocks or ConvNet stages), in forward order."""
    layout = check_cache_model(model, blocks, type(model).__name__)
    return [model.get_submodule(name) for name in layout.units[-blocks:]]


def top_norms(model: nn.Module) -> list[nn.Module]:
    """The modules after the blocks that train with a top: the final norm and the pooling's."""
    layout = layout_of(model)
    names = ((layout.tail,) if layout.tail else ()) + layout.head_norms
    return [model.get_submodule(n) for n in names]


def model_top(model: nn.Module, blocks: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs on a cached row: (B, T, D) or (B, C, H, W) → (B, D') pooled embedding, through
    the model's own last ``blocks`` blocks, final norm and pooling (the same parameters)."""
    top = top_blocks(model, blocks)
    tail = layout_of(model).tail
    finish = model.get_submodule(tail) if tail else nn.Identity()

    def run(x: torch.Tensor) -> torch.Tensor:
        for block in top:
            x = block(x)
        return model.forward_head(finish(x), pre_logits=True)

    return run


def chunk_rows_for(row_values: int, itemsize: int) -> int:
    """Rows per chunk so a chunk holds about `CHUNK_BYTES` (at least 1, at most the store's
    default chunk rows)."""
    from stores.schema import DEFAULT_CHUNK_ROWS

    return max(1, min(DEFAULT_CHUNK_ROWS, CHUNK_BYTES // max(1, row_values * itemsize)))
