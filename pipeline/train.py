"""Train a `HeadBank` over cached features in one pass per epoch, and select the best head.

The recipe (DINOv2's linear evaluation, with per-head augmentations):

* one optimizer with parameter groups per head (its lr; weight decay on the linear weight only),
  a cosine schedule with linear warm-up scaling every head's lr (`lr_at`);
* each batch ``x (B, D)`` is normalized once; all heads' clean logits come from one matmul;
* heads are grouped by augmentation setting: a head-independent augmentation runs once per group
  on ``x̂`` and its rows go through that group's heads in one matmul; a per-head one (CARROT) runs
  per head of its group with the head's own ``z``, logits and weight;
* each head's loss is ``CE(clean) + aug_weight · CE(augmented)``; the bank's loss is the SUM over
  heads, so each head's gradient is exactly that of its own loss;
* after every epoch all heads are scored on the validation split (balanced accuracy = mean
  per-class accuracy; ties broken by validation loss); each head keeps its best state and stops
  after ``patience`` epochs without improvement (its lr becomes 0); training ends when all stop;
* the best head is chosen on validation only; only that head is evaluated on test.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import FeatureAugmentation, create_augmentation
from pipeline.errors import InputError
from pipeline.features import FeatureSet, Split
from pipeline.heads import Head, HeadBank, HeadGrid, HeadSpec
from pipeline.metrics import classification_metrics

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the head-bank training loop (per-head settings live in `HeadSpec`)."""

    optimizer: str = "adamw"  # "adamw" | "sgd"
    optimizer_impl: str = "auto"  # "auto" | "torch" | "multi_tensor" (see create_optimizer)
    epochs: int = 30  # maximum epochs
    batch_size: int = 256  # rows per step (shared by all heads)
    warmup_epochs: float = 1.0  # linear lr warm-up, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.0  # final lr as a fraction of each head's peak lr
    momentum: float = 0.9  # SGD momentum
    label_smoothing: float = 0.0  # used by heads whose spec leaves it None
    aug_warmup_epochs: int = 0  # no augmentation during the first epochs (head not warm yet)
    patience: int | None = 10  # epochs without validation improvement before a head stops
    min_steps: int = 0  # small train sets: raise epochs (and patience) to reach this many steps
    seed: int = 0  # batch order and augmentation noise
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"...
    dtype: str = "float32"  # autocast dtype of the matmuls: float32 | bfloat16 | float16
    eval_batch_size: int = 8192  # rows per evaluation chunk
    val_fraction: float = 0.1  # class-balanced validation carved from train when there is none

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise InputError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(
                f"epochs and batch_size must be >= 1 ({self.epochs}, {self.batch_size})"
            )
        if self.optimizer_impl not in ("auto", "torch", "multi_tensor"):
            raise InputError(
                f"optimizer_impl must be 'auto', 'torch' or 'multi_tensor', got "
                f"{self.optimizer_impl!r}"
            )
        if self.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.min_steps < 0:
            raise InputError(f"min_steps must be >= 0, got {self.min_steps}")
        if self.patience is not None and self.patience < 1:
            raise InputError(f"patience must be >= 1 or None, got {self.patience}")


def lr_at(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based). Pure.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    cosine decay from 1 (first step after warm-up) towards ``min_ratio``, reached at
    ``step == total_steps`` (one past the last step, so no step is wasted at lr = 0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    """What `train_head_bank` returns. Per-head lists are indexed like ``specs``."""

    specs: tuple[HeadSpec, ...]
    bank: HeadBank  # every head in its best (validation) state
    val: list[dict[str, float]]  # per head: balanced_accuracy, accuracy, loss, best_epoch...
    best_index: int
    test: dict[str, float] | None  # metrics of the best head on test (None: no test split)
    curves: dict[str, list[list[float]]]  # per epoch, per head: train_loss, val_*
    diagnostics: list[dict[int, dict[str, float]]]  # per epoch: head -> mean CARROT diagnostics
    class_names: tuple[str, ...]
    config: TrainConfig
    test_probs: np.ndarray | None = None  # (N_test, C) float32, best head
    test_labels: np.ndarray | None = None  # (N_test,) int64
    test_ids: tuple[str, ...] | None = None
    epochs_run: int = 0

    @property
    def best_spec(self) -> HeadSpec:
        return self.specs[self.best_index]

    def best_head(self) -> Head:
        """The chosen head as a plain `Head` module."""
        return self.bank.head(self.best_index)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (for metrics.json)."""
        return {
            "best_index": self.best_index,
            "best_spec": self.best_spec.to_dict(),
            "best_val": self.val[self.best_index],
            "test": self.test,
            "epochs_run": self.epochs_run,
            "heads": [
                {"spec": s.to_dict(), "val": v} for s, v in zip(self.specs, self.val, strict=True)
            ],
        }


# ----------------------------------------------------------------------------- pieces
def create_optimizer(
    bank: HeadBank, specs: Sequence[HeadSpec], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """One optimizer, two parameter groups per head (linear weight with the head's weight
    decay; LayerNorm affine without), each tagged ``head=h`` and ``base_lr=spec.lr``.

    ``cfg.optimizer_impl``: ``"torch"`` = torch's AdamW/SGD (fused kernels, one step per group:
    fastest on a CPU); ``"multi_tensor"`` = `MultiHeadAdamW`/`MultiHeadSGD` (the same math,
    one multi-tensor step across all groups: a constant number of kernel launches however many
    heads — for CUDA); ``"auto"`` picks multi_tensor on CUDA, torch elsewhere.
    """
    groups: list[dict[str, Any]] = []
    for h, spec in enumerate(specs):
        linear, norm = bank.head_parameters(h)
        common = {"lr": spec.lr, "base_lr": spec.lr, "head": h}
        groups.append({"params": linear, "weight_decay": spec.weight_decay, **common})
        groups.append({"params": norm, "weight_decay": 0.0, **common})
    device = bank.weight.device
    impl = cfg.optimizer_impl
    if impl == "auto":
        impl = "multi_tensor" if device.type == "cuda" else "torch"
    if impl == "multi_tensor":
        if cfg.optimizer == "sgd":
            return MultiHeadSGD(groups, lr=specs[0].lr, momentum=cfg.momentum)
        return MultiHeadAdamW(groups, lr=specs[0].lr)
    fused = True if device.type in ("cpu", "cuda") else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=specs[0].lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=specs[0].lr, fused=fused)


class MultiHeadAdamW(torch.optim.Optimizer):
    """torch's AdamW (its multi-tensor math: decoupled decay, bias-corrected moments, no
    amsgrad) stepping ALL parameter groups with one set of ``torch._foreach_*`` calls, each
    group's lr and weight decay passed as per-tensor scalars. Groups must share betas and eps."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ps, gs, ms, vs, decay, step_size, bc2_sqrt = [], [], [], [], [], [], []
        b1, b2 = self.param_groups[0]["betas"]
        eps = self.param_groups[0]["eps"]
        for group in self.param_groups:
            if tuple(group["betas"]) != (b1, b2) or group["eps"] != eps:
                raise ValueError("MultiHeadAdamW needs the same betas and eps in every group")
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = st["step"]
                ps.append(p)
                gs.append(p.grad)
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
                decay.append(1.0 - lr * wd)
                step_size.append(-lr / (1.0 - b1**t))
                bc2_sqrt.append(math.sqrt(1.0 - b2**t))
        if not ps:
            return loss
        torch._foreach_mul_(ps, decay)
        torch._foreach_lerp_(ms, gs, 1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, step_size)
        return loss


class MultiHeadSGD(torch.optim.Optimizer):
    """torch's SGD with momentum (coupled L2 weight decay, no dampening, no Nesterov) stepping
    ALL groups with one set of ``torch._foreach_*`` calls (per-group lr/decay as per-tensor
    scalars). Groups must share the momentum."""

    def __init__(self, params, *, lr=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mom = self.param_groups[0]["momentum"]
        ps, gs, wds, lrs, bufs, fresh = [], [], [], [], [], []
        for group in self.param_groups:
            if group["momentum"] != mom:
                raise ValueError("MultiHeadSGD needs the same momentum in every group")
            for p in group["params"]:
                if p.grad is None:
                    continue
                ps.append(p)
                gs.append(p.grad)
                wds.append(group["weight_decay"])
                lrs.append(-group["lr"])
                st = self.state[p]
                fresh.append("momentum_buffer" not in st)
                bufs.append(st.get("momentum_buffer"))
        if not ps:
            return loss
        d_p = torch._foreach_mul(ps, wds)
        torch._foreach_add_(d_p, gs)  # grad + wd·param
        if mom != 0:
            old = [i for i, f in enumerate(fresh) if not f]
            if old:  # buf = mom·buf + d_p
                torch._foreach_mul_([bufs[i] for i in old], mom)
                torch._foreach_add_([bufs[i] for i in old], [d_p[i] for i in old])
            for i, p in enumerate(ps):
                if fresh[i]:  # first step: buf = d_p
                    bufs[i] = self.state[p]["momentum_buffer"] = d_p[i].clone()
            d_p = bufs
        torch._foreach_add_(ps, torch._foreach_mul(d_p, lrs))
        return loss


def cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    smoothing: torch.Tensor,
    *,
    y_soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head mean CE: ``logits (M, h, C)`` (batch-major), ``y (M,)`` (or soft
    ``y_soft (M, C)``), ``smoothing (h,)`` → ``(h,)``.
    Same as ``F.cross_entropy(logits[:, i], y, label_smoothing=smoothing[i])`` per head."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if y_soft is None:
        idx = y.view(-1, 1, 1).expand(-1, logp.shape[1], 1)
        nll = -logp.gather(-1, idx).squeeze(-1)  # (M, h)
    else:
        nll = -(logp * y_soft.to(logp.dtype)[:, None, :]).sum(-1)
    smooth = -logp.mean(-1)
    s = smoothing.to(logp.dtype)
    return ((1 - s) * nll + s * smooth).mean(0)


@torch.no_grad()
def evaluate_bank(
    bank: HeadBank, split: Split, *, batch_size: int = 8192, heads: slice | None = None
) -> dict[str, torch.Tensor]:
    """Score heads on a split: ``balanced_accuracy``, ``accuracy``, ``loss`` (mean CE), each
    ``(h,)`` float tensors on the bank's device."""
    sl = heads if heads is not None else slice(None)
    h = len(range(bank.num_heads)[sl])
    C = bank.num_classes
    dev = bank.weight.device
    hits = torch.zeros(h, C, device=dev)
    loss = torch.zeros(h, device=dev, dtype=torch.float64)
    n = len(split)
    for start in range(0, n, batch_size):
        X, y = split.X[start : start + batch_size], split.y[start : start + batch_size]
        logits = bank.head_logits(bank.normalize(X), sl)  # (b, h, C)
        logp = F.log_softmax(logits.float(), dim=-1)
        loss += -logp.gather(-1, y.view(-1, 1, 1).expand(-1, h, 1)).squeeze(-1).sum(0).double()
        correct = (logits.argmax(-1) == y[:, None]).float().t()  # (h, b)
        hits.index_add_(1, y, correct)
    counts = torch.bincount(split.y, minlength=C).float()
    present = counts > 0
    per_class = hits[:, present] / counts[present]
    return {
        "balanced_accuracy": per_class.mean(1) if n else torch.zeros(h, device=dev),
        "accuracy": hits.sum(1) / max(n, 1),
        "loss": (loss / max(n, 1)).float(),
    }


def _stable_seed(*parts: Any) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


@dataclass
class _Group:
    """Heads sharing one augmentation setting."""

    key: tuple[str, Any]
    heads: list[int]
    augs: list[FeatureAugmentation]  # one shared (per_head False) or one per head
    generators: list[torch.Generator]
    per_head: bool
    index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def span(self) -> slice | None:
        """The heads as a slice when they are contiguous (the usual grid order), else None."""
        lo, hi = self.heads[0], self.heads[-1] + 1
        return slice(lo, hi) if self.heads == list(range(lo, hi)) else None


def _build_groups(
    specs: Sequence[HeadSpec], cfg: TrainConfig, *, num_classes: int, dim: int, device: torch.device
) -> list[_Group]:
    groups = []
    for key, heads in HeadGrid(tuple(specs)).groups().items():
        name, settings = key
        if name == "none":
            continue
        first = create_augmentation(name, settings, num_classes=num_classes, dim=dim)
        if first.per_head:
            augs = [first] + [
                create_augmentation(name, settings, num_classes=num_classes, dim=dim)
                for _ in heads[1:]
            ]
            seeds = [_stable_seed(cfg.seed, specs[h].seed, key) for h in heads]
        else:
            augs, seeds = [first], [_stable_seed(cfg.seed, key)]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        idx = torch.as_tensor(heads, dtype=torch.int64, device=device)
        groups.append(_Group(key, list(heads), augs, gens, first.per_head, idx))
    return groups


def _fit_augmentations(groups: list[_Group], features: FeatureSet, seed: int) -> None:
    needing = [a for g in groups for a in g.augs if getattr(a, "needs_fit", True)]
    if not needing:
        return
    per_class = max(
        int(getattr(getattr(a, "settings", None), "max_per_class", 512)) for a in needing
    )
    X, y = features.fit_sample("train", max_per_class=per_class, seed=seed)
    for a in needing:
        a.fit(X, y)


@dataclass
class _FitOutput:
    bank: HeadBank
    val: list[dict[str, float]]
    curves: dict[str, list[list[float]]]
    diagnostics: list[dict[int, dict[str, float]]]
    epochs_run: int


def scale_for_min_steps(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """``cfg`` with epochs (and patience, warm-up epochs, in proportion) raised so that training
    takes at least ``cfg.min_steps`` optimizer steps; unchanged when it already does."""
    factor = math.ceil(cfg.min_steps / max(1, cfg.epochs * steps_per_epoch))
    if factor <= 1:
        return cfg
    return replace(
        cfg,
        epochs=cfg.epochs * factor,
        patience=None if cfg.patience is None else cfg.patience * factor,
        warmup_epochs=cfg.warmup_epochs * factor,
        aug_warmup_epochs=cfg.aug_warmup_epochs * factor,
    )


def fit_bank(
    features: FeatureSet,
    specs: Sequence[HeadSpec],
    cfg: TrainConfig,
    *,
    val_split: str | None = "val",
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> _FitOutput:
    """Train one bank on ``features``' train split. With ``val_split``: per-head best state and
    early stopping; without: the final state after ``cfg.epochs`` epochs."""
    device = torch.device(cfg.device)
    if features.device != device:
        raise InputError(
            f"features are on {features.device} but TrainConfig.device is {device}; "
            "build the FeatureSet with the same device"
        )
    H, C, D = len(specs), features.num_classes, features.dim
    bank = HeadBank(H, D, C, seeds=[s.seed for s in specs], device=device)
    opt = create_optimizer(bank, specs, cfg)
    groups = _build_groups(specs, cfg, num_classes=C, dim=D, device=device)
    _fit_augmentations(groups, features, cfg.seed)
    smoothing = torch.tensor(
        [cfg.label_smoothing if s.label_smoothing is None else s.label_smoothing for s in specs],
        device=device,
    )
    val = features.get(val_split) if val_split else None

    n_train = features.num_rows("train")
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    cfg = scale_for_min_steps(cfg, steps_per_epoch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    amp_dtype = _DTYPES[cfg.dtype]
    use_amp = amp_dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    active = [True] * H
    best = {"bal": [-1.0] * H, "loss": [math.inf] * H, "epoch": [-1] * H}
    best_states = [bank.head_state(h) for h in range(H)]
    since_best = [0] * H
    curves: dict[str, list[list[float]]] = {
        "train_loss": [],
        "val_balanced_accuracy": [],
        "val_accuracy": [],
        "val_loss": [],
    }
    diagnostics: list[dict[int, dict[str, float]]] = []
    step = 0
    epochs_run = 0
    for epoch in range(cfg.epochs):
        aug_on = epoch >= cfg.aug_warmup_epochs
        loss_sum = torch.zeros(H, device=device)
        n_steps = 0
        diag_acc: dict[int, dict[str, list[torch.Tensor]]] = {}
        for X, y in features.batches("train", cfg.batch_size, generator=shuffle_gen):
            mult = lr_at(
                step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=cfg.min_lr_ratio
            )
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult if active[g["head"]] else 0.0
            amp = torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()
            with amp:
                losses = _bank_loss(bank, X, y, groups, smoothing, aug_on, diag_acc)
            opt.zero_grad(set_to_none=True)
            scaler.scale(losses.sum()).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += losses.detach()
            n_steps += 1
            step += 1
        epochs_run = epoch + 1
        curves["train_loss"].append((loss_sum / max(n_steps, 1)).tolist())
        diagnostics.append(
            {
                h: {k: float(torch.stack(v).float().mean()) for k, v in d.items()}
                for h, d in diag_acc.items()
            }
        )
        if val is None:
            continue
        m = evaluate_bank(bank, val, batch_size=cfg.eval_batch_size)
        bal, acc, vloss = (m[k].tolist() for k in ("balanced_accuracy", "accuracy", "loss"))
        curves["val_balanced_accuracy"].append(bal)
        curves["val_accuracy"].append(acc)
        curves["val_loss"].append(vloss)
        for h in range(H):
            if not active[h]:
                continue
            if bal[h] > best["bal"][h] or (bal[h] == best["bal"][h] and vloss[h] < best["loss"][h]):
                best["bal"][h], best["loss"][h], best["epoch"][h] = bal[h], vloss[h], epoch
                best_states[h] = bank.head_state(h)
                since_best[h] = 0
            else:
                since_best[h] += 1
                if cfg.patience is not None and since_best[h] >= cfg.patience:
                    active[h] = False
        logger.info(
            "epoch %d: best val balanced acc %.4f, %d/%d heads active",
            epoch,
            max(best["bal"]),
            sum(active),
            H,
        )
        if on_epoch is not None:
            on_epoch(epoch, {"val_balanced_accuracy": bal, "train_loss": curves["train_loss"][-1]})
        if not any(active):
            break

    out_val: list[dict[str, float]] = []
    if val is not None:
        for h in range(H):
            bank.load_head_state(h, best_states[h])
        m = evaluate_bank(bank, val, batch_size=cfg.eval_batch_size)
        for h in range(H):
            out_val.append(
                {
                    "balanced_accuracy": float(m["balanced_accuracy"][h]),
                    "accuracy": float(m["accuracy"][h]),
                    "loss": float(m["loss"][h]),
                    "best_epoch": best["epoch"][h],
                    "stopped": not active[h],
                }
            )
    return _FitOutput(bank, out_val, curves, diagnostics, epochs_run)


def _bank_loss(
    bank: HeadBank,
    X: torch.Tensor,
    y: torch.Tensor,
    groups: list[_Group],
    smoothing: torch.Tensor,
    aug_on: bool,
    diag_acc: dict[int, dict[str, list[torch.Tensor]]],
) -> torch.Tensor:
    """Per-head training loss ``(H,)`` for one batch ``X (B, D)``, ``y (B,)``."""
    xhat = bank.normalize(X)  # (B, D): once for all heads
    logits = bank.head_logits(xhat)  # (B, H, C): one matmul for all heads
    losses = cross_entropy(logits, y, smoothing)
    if not aug_on:
        return losses
    for g in groups:
        if g.per_head:
            for j, (aug, gen, h) in enumerate(zip(g.augs, g.generators, g.heads, strict=True)):
                W = bank.head_weight(h)  # (C, D), gradient straight to head h's parameter
                if getattr(aug, "pre_ln", False):  # noise on the raw x, then the head's LN
                    out = aug(
                        X,
                        y,
                        logits[:, h].detach(),
                        W.detach(),
                        generator=gen,
                        ln=bank.layer_norm(h),
                    )
                    z_aug = bank.head_features(bank.normalize(out.z), h)
                else:
                    z = bank.head_features(xhat, h)  # (B, D) with grad to the head's LN
                    out = aug(z, y, logits[:, h].detach(), W.detach(), generator=gen)
                    z_aug = out.z
                if out.diagnostics:
                    acc = diag_acc.setdefault(h, {})
                    for k, v in out.diagnostics.items():
                        if isinstance(v, (int, float, torch.Tensor)):  # no host sync per step
                            acc.setdefault(k, []).append(
                                torch.as_tensor(v, device=X.device).detach()
                            )
                if len(out) == 0:
                    continue
                la = (z_aug @ W.t())[:, None]  # (M, 1, C): z̃ is post-LN already
                ce = cross_entropy(la, out.y, smoothing[h : h + 1], y_soft=out.y_soft)
                losses = losses.index_add(0, g.index[j : j + 1], aug.aug_weight * ce)
            continue
        aug = g.augs[0]
        out = aug(xhat, y, None, None, generator=g.generators[0])
        if len(out) == 0:
            continue
        span = g.span
        la = bank.head_logits(out.z, span) if span else bank.head_logits(out.z)[:, g.index]
        ce = cross_entropy(la, out.y, smoothing[g.index], y_soft=out.y_soft)
        losses = losses.index_add(0, g.index, aug.aug_weight * ce)
    return losses


# ----------------------------------------------------------------------------- entry point
def select_best(val: Sequence[dict[str, float]]) -> int:
    """Index of the head with the highest validation balanced accuracy; ties → lowest
    validation loss → lowest index."""
    return min(range(len(val)), key=lambda h: (-val[h]["balanced_accuracy"], val[h]["loss"], h))


def train_head_bank(
    features: FeatureSet,
    grid: HeadGrid | Sequence[HeadSpec],
    cfg: TrainConfig | None = None,
    *,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train every head of ``grid`` in one bank, pick the best on validation, test it.

    ``features`` needs a ``train`` split; ``val`` is carved from it (class-balanced,
    ``cfg.val_fraction``) when missing; ``test`` is optional and only the chosen head sees it.
    """
    cfg = cfg if cfg is not None else TrainConfig()
    specs = tuple(grid.specs if isinstance(grid, HeadGrid) else grid)
    if not specs:
        raise InputError("the head grid is empty")
    if not features.has("train"):
        raise InputError(f"features have no 'train' split (have {features.names()})")
    features = features.with_validation(fraction=cfg.val_fraction, seed=cfg.seed)
    fit = fit_bank(features, specs, cfg, val_split="val", on_epoch=on_epoch)
    best = select_best(fit.val)
    logger.info("best head %d (%s): val %s", best, specs[best].name, fit.val[best])
    result = TrainResult(
        specs=specs,
        bank=fit.bank,
        val=fit.val,
        best_index=best,
        test=None,
        curves=fit.curves,
        diagnostics=fit.diagnostics,
        class_names=features.class_names,
        config=cfg,
        epochs_run=fit.epochs_run,
    )
    if features.has("test"):
        from pipeline.predict import predict

        test = features.get("test")
        _, probs = predict(result.best_head(), test.X, batch_size=cfg.eval_batch_size)
        labels = test.y.cpu().numpy()
        result.test = classification_metrics(labels, probs)
        result.test_probs, result.test_labels, result.test_ids = probs, labels, test.ids
    return result
