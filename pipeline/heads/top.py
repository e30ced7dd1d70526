"""Partially frozen training over an activation cache (``carrot train STORE --trainable-blocks
N``).

A store written with ``carrot embed --cache-at block:-M`` holds, per image, what enters the
backbone's last M blocks (ViT tokens, or a ResNet / ConvNeXt feature map:
`pipeline.embed.cache_point`). This module rebuilds the backbone from the store's identity (same
name, weights and input size), keeps its last M blocks, final norm and pooling, and trains the
last N ≤ M of those blocks, the final norm and pooling norm, and a LayerNorm + Linear head on the
pooled embedding — never running the frozen trunk. Blocks between (M − N of them) run frozen.
An augmentation (CARROT included) acts on the head's post-LayerNorm input as in the bank; its
extra rows keep their gradient to the pooled embedding, so the augmented loss reaches the
trainable blocks.

Shapes: a cached row (B, T, D) or (B, C, H, W) → pooled (B, D') → logits (B, C). BatchNorm in
the frozen blocks stays in eval mode while the top trains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embed.cache_point import model_top, top_blocks, top_norms
from pipeline.embed.seeding import seeded_global_rngs
from pipeline.errors import InputError


@dataclass(frozen=True)
class TopSettings:
    """One partially frozen run."""

    blocks: int  # trainable blocks N (≤ the store's cache point M)
    aug: str = "none"  # augmentation of the head's input (pipeline.augment registry)
    epochs: int = 10
    lr: float = 1e-3  # AdamW learning rate (blocks, norms and head)
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None  # the file a checkpoint-written cache came from (sha256-checked)

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise InputError(f"--trainable-blocks {self.blocks}: give N ≥ 1")
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise InputError(f"{option} {value}: give a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lrs {self.lr}: give one positive learning rate")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"--wds {self.weight_decay}: give one weight decay ≥ 0")


@dataclass
class TopResult:
    """Per-epoch mean training loss, accuracies, and which parameters moved."""

    train_loss: list[float]
    val_top1: float | None
    test_top1: float | None
    test_mean_per_class: float | None
    trainable: list[str]  # parameter names (model parameters prefixed "model.")
    changed: list[str]  # parameters that differ from their initial values after training
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # trained tensors

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_loss": self.train_loss,
            "val_top1": self.val_top1,
            "test_top1": self.test_top1,
            "test_mean_per_class": self.test_mean_per_class,
            "trainable": self.trainable,
            "changed": self.changed,
            "seconds": round(self.seconds, 2),
            **self.diagnostics,
        }


def cache_point(store: Any) -> tuple[int, tuple[int, ...]]:
    """(M, row shape) of an activation-cache store — (T, D) tokens or (C, H, W) feature map;
    `InputError` naming the fix for any other store."""
    extra = store.identity.extra
    if "cache_at" not in extra:
        raise InputError(
            f"store {store.url} holds pooled embeddings; --trainable-blocks needs an activation "
            "cache: carrot embed DATA --backbone NAME --cache-at block:-N"
        )
    shape = extra.get("tokens") or extra["feature_map"]
    return int(str(extra["cache_at"]).split(":-")[1]), tuple(int(v) for v in shape)


def check_blocks(store: Any, blocks: int) -> int:
    """The store's cache point M, or `InputError` when ``blocks`` > M (or not an activation cache)."""
    cached, _ = cache_point(store)
    if blocks > cached:
        raise InputError(
            f"--trainable-blocks {blocks}: store {store.url} caches the input of the last "
            f"{cached} block(s); give at most {cached}, or embed with --cache-at block:-{blocks}"
        )
    return cached


def backbone_config_of(store: Any, *, device: str = "cpu", checkpoint: str | None = None):
    """The `BackboneConfig` that wrote ``store``: its random-init seed, hub tag, or — for a
    checkpoint-written store, whose identity keeps the file's sha256 but not its path — the
    ``checkpoint`` file given, refused unless its sha256 is the store's."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.weights import file_sha256

    ident = store.identity
    weights = ident.weights
    blocks, _ = cache_point(store)
    common = {
        "image_size": int(ident.data_config["input_size"][-1]),
        "device": device,
        "cache_at": blocks,
    }
    if weights.get("kind") == "random":
        return BackboneConfig(name=ident.backbone, seed=int(weights.get("seed", 0)), **common)
    if weights.get("kind") == "hub":
        return BackboneConfig(name=weights.get("tag", ident.backbone), pretrained=True, **common)
    fix = f"pass --checkpoint PATH, the file {weights.get('file')!r} the cache was written with"
    if checkpoint is None:
        raise InputError(f"store {store.url} was written from a checkpoint; {fix}")
    try:
        digest = file_sha256(checkpoint)
    except (OSError, InputError) as e:
        raise InputError(f"--checkpoint {checkpoint}: cannot read it ({e}); {fix}") from None
    if digest != weights.get("sha256"):
        raise InputError(
            f"--checkpoint {checkpoint}: sha256 {digest[:12]}… is not the {weights.get('sha256', '')[:12]}… "
            f"of store {store.url}; {fix}"
        )
    return BackboneConfig(name=ident.backbone, checkpoint=checkpoint, **common)


class PartialTop(nn.Module):
    """The backbone's top over cached activations plus a LayerNorm + Linear head.

    ``frozen`` blocks (no gradient, always in eval mode) run first, then the ``trainable`` ones,
    the final norm and ``forward_head(pre_logits=True)`` (pooling and its norm)."""

    def __init__(self, model: nn.Module, cached: int, trainable: int, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.frozen = top_blocks(model, cached)[: cached - trainable]
        self.trainable = nn.ModuleList(top_blocks(model, trainable))
        self.norms = top_norms(model)
        self._top = model_top(model, trainable)  # the trainable blocks, final norm, pooling
        dim = int(model.num_features)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> PartialTop:
        """Train mode for the top; the frozen blocks stay in eval mode (BatchNorm statistics)."""
        super().train(mode)
        for block in self.frozen:
            block.eval()
        return self

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) or (B, C, H, W) cached rows → (B, D') pooled embedding."""
        if self.frozen:
            with torch.no_grad():
                for block in self.frozen:
                    tokens = block(tokens)
        return self._top(tokens)

    def head_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """A cached row (B, T, D) or (B, C, H, W) → (B, D') the head's post-LayerNorm input."""
        return self.ln(self.pooled(tokens))


def trainable_parameters(top: PartialTop) -> list[str]:
    """Mark what trains (the trainable blocks, the final and pooling norms, the head); freeze the
    rest. Returns their names."""
    top.requires_grad_(False)
    for part in [top.trainable, *top.norms, top.ln, top.fc]:
        part.requires_grad_(True)
    return [n for n, p in top.named_parameters() if p.requires_grad]


def _rows(store: Any, split: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(store.features(split)).view(-1, *shape)  # (n, T, D) or (n, C, H, W)
    return x, torch.from_numpy(store.labels(split).astype(np.int64))


def _head_inputs(top: PartialTop, X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, ...) cached rows → (N, D') head inputs without gradient, 256 rows at a time."""
    with torch.no_grad():
        return torch.cat([top.head_input(X[b].to(device)) for b in torch.arange(len(X)).split(256)])


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from order.split(size)


def train_top(
    store: Any,
    settings: TopSettings,
    *,
    train_index: np.ndarray | None = None,
    aug_settings: Any = None,
) -> TopResult:
    """Train ``settings.blocks`` blocks + norms + head over the activation cache ``store``:
    on the rows ``train_index`` of its train split (None: all of them), with the augmentation's
    ``aug_settings`` (None: its defaults).

    Raises:
        InputError: not an activation cache, N above the cache point, a checkpoint-written
            store without its checkpoint (or with another file).
    """
    from pipeline.augment.registry import create_augmentation
    from pipeline.embed.backbone import create_backbone

    t0 = time.perf_counter()
    cached = check_blocks(store, settings.blocks)
    _, shape = cache_point(store)
    num_classes = len(store.class_names)
    device = torch.device(settings.device)
    with seeded_global_rngs(settings.seed):  # the top's init, one thread at a time
        cfg = backbone_config_of(store, device=settings.device, checkpoint=settings.checkpoint)
        backbone = create_backbone(cfg)
        top = PartialTop(backbone.model, cached, settings.blocks, num_classes).to(device)
    names = trainable_parameters(top)
    top.train()
    before = {n: p.detach().clone() for n, p in top.named_parameters() if p.requires_grad}
    X, y = _rows(store, "train", shape)
    if train_index is not None:
        keep = torch.as_tensor(np.asarray(train_index), dtype=torch.int64)
        X, y = X[keep], y[keep]
    aug = create_augmentation(settings.aug, aug_settings, num_classes=num_classes)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.Generator(device=device).manual_seed(settings.seed + 1)
    if aug.needs_fit:
        aug.fit(_head_inputs(top, X, device), y.to(device))
    params = [p for p in top.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    losses, extra_rows = [], 0
    for _ in range(settings.epochs):
        total, seen = 0.0, 0
        for idx in _batches(len(X), settings.batch_size, generator):
            xb, yb = X[idx].to(device), y[idx].to(device)
            z = top.head_input(xb)  # (B, D) post-LN, with gradient into the blocks
            logits = top.fc(z)
            loss = F.cross_entropy(logits, yb)
            if settings.aug != "none":
                extra = aug(z, yb, logits.detach(), top.fc.weight.detach(), generator=noise)
                if len(extra):
                    target = extra.y_soft if extra.y_soft is not None else extra.y
                    loss = loss + aug.aug_weight * F.cross_entropy(top.fc(extra.z), target)
                    extra_rows += len(extra)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        losses.append(total / seen)
    top.eval()
    changed = [n for n in names if not torch.equal(before[n], top.get_parameter(n).detach())]
    (val_top1, _), (test_top1, test_mpc) = (
        _accuracy(top, store, s, shape, device) for s in ("val", "test")
    )
    return TopResult(
        train_loss=losses,
        val_top1=val_top1,
        test_top1=test_top1,
        test_mean_per_class=test_mpc,
        trainable=names,
        changed=changed,
        seconds=time.perf_counter() - t0,
        diagnostics={"aug": settings.aug, "augmented_rows": extra_rows, "cached_blocks": cached},
        state={n: top.get_parameter(n).detach().cpu().contiguous() for n in names},
    )


def _accuracy(
    top: PartialTop, store: Any, split: str, shape, device
) -> tuple[float | None, float | None]:
    """(top-1, mean per-class accuracy) on ``split``; (None, None) when it has no rows."""
    from pipeline.heads.metrics import mean_per_class_accuracy

    if split not in store.splits():
        return None, None
    X, y = _rows(store, split, shape)
    if not len(y):
        return None, None
    with torch.no_grad():
        pred = top.fc(_head_inputs(top, X, device)).argmax(-1).cpu()
    return float((pred == y).double().mean()), float(
        mean_per_class_accuracy(y.numpy(), pred.numpy())
    )
