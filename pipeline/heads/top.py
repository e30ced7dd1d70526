"""Partially frozen training over a token cache (``carrot train STORE --trainable-blocks N``).

A store written with ``carrot embed --cache-at block:-M`` holds, per image, the tokens entering
the backbone's last M blocks. This module rebuilds the backbone from the store's identity (same
name, weights and input size), keeps its last M blocks, final norm and pooling, and trains the
last N ≤ M of those blocks, the final norm and pooling norm, and a LayerNorm + Linear head on the
pooled embedding — never running the frozen trunk. Blocks between (M − N of them) run frozen.
An augmentation (CARROT included) acts on the head's post-LayerNorm input as in the bank; its
extra rows keep their gradient to the pooled embedding, so the augmented loss reaches the
trainable blocks.

Shapes: tokens (B, T, D) → pooled (B, D') → logits (B, C).
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

from pipeline.embed.cache_point import model_top
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
            "trainable": self.trainable,
            "changed": self.changed,
            "seconds": round(self.seconds, 2),
            **self.diagnostics,
        }


def cache_point(store: Any) -> tuple[int, tuple[int, int]]:
    """(M, (T, D)) of a token-cache store; `InputError` naming the fix for any other store."""
    extra = store.identity.extra
    if "cache_at" not in extra:
        raise InputError(
            f"store {store.url} holds pooled embeddings; --trainable-blocks needs a token cache: "
            "carrot embed DATA --backbone NAME --cache-at block:-N"
        )
    t, d = extra["tokens"]
    return int(str(extra["cache_at"]).split(":-")[1]), (int(t), int(d))


def check_blocks(store: Any, blocks: int) -> int:
    """The store's cache point M, or `InputError` when ``blocks`` > M (or not a token cache)."""
    cached, _ = cache_point(store)
    if blocks > cached:
        raise InputError(
            f"--trainable-blocks {blocks}: store {store.url} caches the input of the last "
            f"{cached} block(s); give at most {cached}, or embed with --cache-at block:-{blocks}"
        )
    return cached


def backbone_config_of(store: Any, *, device: str = "cpu"):
    """The `BackboneConfig` that wrote ``store`` (random-init seed or hub tag; a checkpoint's
    path is not in the store, so such stores are refused with the fix)."""
    from pipeline.embed.backbone import BackboneConfig

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
    raise InputError(
        f"store {store.url} was written from a checkpoint ({weights.get('file')}); training its "
        "top from a checkpoint is not supported yet: write the cache with --pretrained or a "
        "random init"
    )


class PartialTop(nn.Module):
    """The backbone's top over cached tokens plus a LayerNorm + Linear head.

    ``frozen`` blocks (no gradient) run first, then the ``trainable`` ones, the final norm and
    ``forward_head(pre_logits=True)`` (pooling, ``fc_norm``)."""

    def __init__(self, model: nn.Module, cached: int, trainable: int, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.frozen = list(model.blocks[-cached:][: cached - trainable])
        self.trainable = model.blocks[-trainable:]
        self._top = model_top(model, trainable)  # the trainable blocks, final norm, pooling
        dim = int(model.num_features)
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) cached tokens → (B, D') pooled embedding."""
        if self.frozen:
            with torch.no_grad():
                for block in self.frozen:
                    tokens = block(tokens)
        return self._top(tokens)

    def head_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, D') the head's post-LayerNorm input."""
        return self.ln(self.pooled(tokens))


def trainable_parameters(top: PartialTop) -> list[str]:
    """Mark what trains (the trainable blocks, the final and pooling norms, the head); freeze the
    rest. Returns their names."""
    top.requires_grad_(False)
    parts: list[nn.Module] = [top.trainable, top.model.norm, top.ln, top.fc]
    if isinstance(getattr(top.model, "fc_norm", None), nn.Module):
        parts.append(top.model.fc_norm)
    for part in parts:
        part.requires_grad_(True)
    return [n for n, p in top.named_parameters() if p.requires_grad]


def _rows(store: Any, split: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(store.features(split)).view(-1, *shape)  # (n, T, D) float32
    return x, torch.from_numpy(store.labels(split).astype(np.int64))


def _head_inputs(top: PartialTop, X: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, T, D) tokens → (N, D') head inputs without gradient, 256 rows at a time."""
    with torch.no_grad():
        return torch.cat([top.head_input(X[b].to(device)) for b in torch.arange(len(X)).split(256)])


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    yield from order.split(size)


def train_top(store: Any, settings: TopSettings) -> TopResult:
    """Train ``settings.blocks`` blocks + norms + head over the token cache ``store``.

    Raises:
        InputError: not a token cache, N above the cache point, a checkpoint-written store.
    """
    from pipeline.augment.registry import create_augmentation
    from pipeline.embed.backbone import create_backbone

    t0 = time.perf_counter()
    cached = check_blocks(store, settings.blocks)
    _, shape = cache_point(store)
    num_classes = len(store.class_names)
    device = torch.device(settings.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        backbone = create_backbone(backbone_config_of(store, device=settings.device))
        top = PartialTop(backbone.model, cached, settings.blocks, num_classes).to(device)
    names = trainable_parameters(top)
    top.train()
    before = {n: p.detach().clone() for n, p in top.named_parameters() if p.requires_grad}
    X, y = _rows(store, "train", shape)
    aug = create_augmentation(settings.aug, num_classes=num_classes)
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
    accuracy = {s: _top1(top, store, s, shape, device) for s in ("val", "test")}
    return TopResult(
        train_loss=losses,
        val_top1=accuracy["val"],
        test_top1=accuracy["test"],
        trainable=names,
        changed=changed,
        seconds=time.perf_counter() - t0,
        diagnostics={"aug": settings.aug, "augmented_rows": extra_rows, "cached_blocks": cached},
        state={n: top.get_parameter(n).detach().cpu().contiguous() for n in names},
    )


def _top1(top: PartialTop, store: Any, split: str, shape, device) -> float | None:
    if split not in store.splits():
        return None
    X, y = _rows(store, split, shape)
    if not len(y):
        return None
    with torch.no_grad():
        pred = top.fc(_head_inputs(top, X, device)).argmax(-1).cpu()
    return float((pred == y).double().mean())


TOP_WEIGHTS, TOP_CONFIG = "top.safetensors", "top.json"


def write_top_run(out_dir: str, result: TopResult, store: Any, settings: TopSettings) -> dict:
    """Publish a run folder (`pipeline.heads.io.publish_run`: all or nothing) holding the
    trained tensors (``top.safetensors``: the trainable blocks, norms and head, by parameter
    name) and ``top.json`` (the store, its cache point, the settings, class names, metrics).
    Returns the file paths."""
    import dataclasses
    from pathlib import Path

    from safetensors.torch import save_file

    from pipeline.heads.io import atomic_file, publish_run, write_json

    cached, tokens = cache_point(store)
    config = {
        "kind": "carrot-top",
        "version": 1,
        "store": store.url,
        "store_key": store.key,
        "cached_blocks": cached,
        "tokens": list(tokens),
        "class_names": list(store.class_names),
        "settings": dataclasses.asdict(settings),
        "metrics": result.to_dict(),
    }

    def write(staging: Path) -> dict:
        with atomic_file(staging / TOP_WEIGHTS) as tmp:
            save_file(result.state, str(tmp))
        write_json(staging / TOP_CONFIG, config)
        return {
            "weights": str(Path(out_dir) / TOP_WEIGHTS),
            "config": str(Path(out_dir) / TOP_CONFIG),
        }

    return publish_run(out_dir, write)


def load_top(run_dir: str) -> PartialTop:
    """The trained top of a run folder, on the CPU in eval mode, rebuilt from its store's
    backbone. `InputError` naming the folder when a file is missing or does not fit."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.embed.backbone import create_backbone
    from stores import open_store

    folder = Path(run_dir)
    try:
        config = json.loads((folder / TOP_CONFIG).read_text())
        state = load_file(str(folder / TOP_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(
            f"{run_dir}: not a partially frozen run ({e}); re-run carrot train "
            "--trainable-blocks N --out DIR"
        ) from None
    store = open_store(config["store"])
    if store.key != config["store_key"]:
        raise InputError(f"{run_dir}: its store {config['store']} has changed since training")
    settings = config["settings"]
    backbone = create_backbone(backbone_config_of(store))
    top = PartialTop(
        backbone.model, config["cached_blocks"], settings["blocks"], len(config["class_names"])
    )
    missing = set(state) - {n for n, _ in top.named_parameters()}
    if missing:
        raise InputError(f"{run_dir}: tensors {sorted(missing)[:3]} do not fit the model")
    with torch.no_grad():
        for name, tensor in state.items():
            top.get_parameter(name).copy_(tensor)
    return top.eval()
