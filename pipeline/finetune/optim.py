"""AdamW with layer-wise learning-rate decay, and the step-indexed schedule.

Groups come from timm's own ``param_groups_layer_decay`` over the backbone (its
``group_matcher`` numbers the layers: stem 0, blocks 1…L, final norm on top), so the lr of
layer ℓ is ``lr × layer_decay^(L + 1 − ℓ)``; no weight decay on norms, biases and the tokens the
model lists in ``no_weight_decay()``. The head trains at the full lr (its LayerNorm without
weight decay). The schedule is a pure function of the optimizer step — linear warm-up, then
cosine to 0 — so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay

from pipeline.finetune.model import FinetuneModel


def param_groups(model: FinetuneModel, *, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups, each with ``lr_scale`` (1 for the head and the top layer)."""
    backbone = model.backbone
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    groups = param_groups_layer_decay(
        backbone, weight_decay=weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay
    )
    head = model.head
    groups.append({"params": [head.fc.weight], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append(
        {
            "params": [head.fc.bias, head.norm.weight, head.norm.bias],
            "weight_decay": 0.0,
            "lr_scale": 1.0,
        }
    )
    return groups


def create_optimizer(
    model: FinetuneModel, *, lr: float, weight_decay: float, layer_decay: float
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (each group's lr set by `set_lr`)."""
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, *, peak: float, total: int, warmup: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr × lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
