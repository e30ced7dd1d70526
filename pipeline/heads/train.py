"""Train a `HeadBank` over cached features to convergence, and select the best head.

Every head ``LN(x) → Linear`` minimizes its own objective ``mean CE + λ/2 · ‖W‖²`` (``λ`` = the
spec's weight decay; plus ``aug_weight · CE`` of its augmented rows). The recipe:

1. **Precondition** (`pipeline.heads.precondition`): every head's LayerNorm affine standardizes the
   normalized features of the train split (γ = 1/σ, β = −μ/σ), and stays frozen by default.
2. **Plain heads: full-batch L-BFGS** (`pipeline.heads.lbfgs`) when the train split is in memory —
   the problem is then convex (exactly scikit-learn's multinomial logistic regression on the
   standardized features, ``C = 1/(λN)``) and every head reports whether it reached the optimum
   (max |gradient| ≤ tol, or no further decrease).
3. **Augmented heads** (and every head when the train split is streamed, or with
   ``solver="minibatch"``) start from the L-BFGS solution of their own ``λ`` (for a streamed
   split: solved on a class-stratified sample of ``warm_start_rows`` rows), then train by
   minibatch Adam/SGD (`pipeline.heads.optim.BankOptimizer`: per-head lr and L2 vectors over
   the stacked parameters; coupled L2, cosine schedule after a warm-up) until their epoch
   objective stops changing (relative change below ``tol`` between two windows of ``window``
   epochs) or the epoch budget ends. A head-independent augmentation runs once per group in the
   shared post-LN space; a per-head one (CARROT) augments each head's own ``z`` with its logits,
   weight and bias, and the rows of all the group's heads go through one batched matmul.
4. Every head is scored on the validation split (balanced accuracy; ties by validation loss);
   the best is chosen on validation only, and only it is evaluated on test.
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

from pipeline.augment.carrot import violation_rate
from pipeline.augment.carrot_heads import HeadsOutput
from pipeline.augment.registry import FeatureAugmentation, create_augmentation
from pipeline.defaults import LbfgsSettings, TrainConfig
from pipeline.errors import InputError
from pipeline.heads.bank import HeadBank, HeadGrid, HeadSpec
from pipeline.heads.features import FeatureSet, Split
from pipeline.heads.lbfgs import solve_softmax_lbfgs
from pipeline.heads.optim import BankOptimizer, lr_at
from pipeline.heads.precondition import standardizing_affine
from pipeline.heads.softmax import log_softmax

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- pieces
def cross_entropy(
    logits: torch.Tensor,
    y: torch.Tensor,
    smoothing: torch.Tensor | None,
    *,
    y_soft: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head mean CE: ``logits (M, h, C)`` (batch-major), labels ``y (M,)`` shared by the
    heads or ``y (M, h)`` per head (or soft ``y_soft (M, C)``), ``smoothing (h,)`` → ``(h,)``.
    Same as ``F.cross_entropy(logits[:, i], y, label_smoothing=smoothing[i])`` per head;
    ``smoothing`` None: no head smooths (the same values and gradients as zeros, without the
    smoothing term's operations). ``mask (M, h)`` bool: the mean runs over each head's True
    rows only (padding)."""
    logp = log_softmax(logits.float())
    if y_soft is None:
        idx = y[..., None] if y.ndim == 2 else y.view(-1, 1, 1).expand(-1, logp.shape[1], 1)
        nll = -logp.gather(-1, idx).squeeze(-1)  # (M, h)
    else:
        nll = -(logp * y_soft.to(logp.dtype)[:, None, :]).sum(-1)
    if smoothing is None:
        per_row = nll  # (M, h)
    else:
        s = smoothing.to(logp.dtype)
        per_row = (1 - s) * nll + s * -logp.mean(-1)  # (M, h)
    if mask is None:
        return per_row.mean(0)
    return (per_row * mask).sum(0) / mask.sum(0).clamp_min(1)


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
        logp = log_softmax(logits.float())
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
    specs: Sequence[HeadSpec], cfg: TrainConfig, *, num_classes: int, device: torch.device
) -> list[_Group]:
    groups = []
    for key, heads in HeadGrid(tuple(specs)).groups().items():
        name, settings = key
        if name == "none":
            continue
        first = create_augmentation(name, settings, num_classes=num_classes)
        if first.per_head:
            augs = [first] + [
                create_augmentation(name, settings, num_classes=num_classes) for _ in heads[1:]
            ]
            seeds = [_stable_seed(cfg.seed, specs[h].seed, key) for h in heads]
        else:
            augs, seeds = [first], [_stable_seed(cfg.seed, key)]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        idx = torch.as_tensor(heads, dtype=torch.int64, device=device)
        groups.append(_Group(key, list(heads), augs, gens, first.per_head, idx))
    return groups


@dataclass(frozen=True)
class _Space:
    """The shared post-LN space ``z = γ₀ ⊙ x̂ + β₀`` (the preconditioning affine)."""

    gamma: torch.Tensor  # (D,)
    beta: torch.Tensor  # (D,)

    def to_z(self, xhat: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.beta, xhat, self.gamma)

    def to_xhat(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.beta) / self.gamma


def _fit_augmentations(
    groups: list[_Group], features: FeatureSet, bank: HeadBank, space: _Space, seed: int
) -> None:
    needing = [a for g in groups for a in g.augs if getattr(a, "needs_fit", True)]
    if not needing:
        return
    per_class = max(
        int(getattr(getattr(a, "settings", None), "max_per_class", 512)) for a in needing
    )
    X, y = features.fit_sample("train", max_per_class=per_class, seed=seed)
    Z = space.to_z(bank.normalize(X))
    for a in needing:
        a.fit(Z, y)


def scale_for_min_steps(cfg: TrainConfig, steps_per_epoch: int) -> TrainConfig:
    """``cfg`` with epochs (and warm-up epochs, in proportion) raised so that the minibatch path
    takes at least ``cfg.min_steps`` optimizer steps; unchanged when it already does."""
    factor = math.ceil(cfg.min_steps / max(1, cfg.epochs * steps_per_epoch))
    if factor <= 1:
        return cfg
    return replace(
        cfg,
        epochs=cfg.epochs * factor,
        warmup_epochs=cfg.warmup_epochs * factor,
        aug_warmup_epochs=cfg.aug_warmup_epochs * factor,
    )


def windowed_converged(history: Sequence[float], *, tol: float, window: int) -> bool:
    """True when the mean of the last ``window`` values differs from the mean of the ``window``
    before them by at most ``tol`` relative to the latter (needs ``2·window`` values). Pure."""
    if len(history) < 2 * window:
        return False
    recent = float(np.mean(history[-window:]))
    before = float(np.mean(history[-2 * window : -window]))
    return abs(before - recent) <= tol * max(abs(recent), 1e-12)


@dataclass
class FitOutput:
    """What `fit_bank` returns: the bank in its final state and per-head outcomes."""

    bank: HeadBank
    val: list[dict[str, Any]]  # per head (empty without a validation split)
    status: list[dict[str, Any]]  # per head: solver, converged, steps, objective
    curves: dict[str, list[list[float]]]
    diagnostics: list[dict[int, dict[str, float]]]
    epochs_run: int


def _plain_key(spec: HeadSpec, cfg: TrainConfig) -> tuple[float, float]:
    """What a head's plain objective depends on: ``(λ, label smoothing)``."""
    smoothing = cfg.label_smoothing if spec.label_smoothing is None else spec.label_smoothing
    return (spec.weight_decay, float(smoothing))


def _lbfgs_plain(
    bank: HeadBank,
    z: torch.Tensor,
    y: torch.Tensor,
    keys: Sequence[tuple[float, float]],
    settings: LbfgsSettings,
) -> tuple[list[dict[str, Any]], list[list[float]]]:
    """Solve every head's plain objective (``keys``: its `_plain_key`; distinct keys once) into
    the bank's linear layers; per-head status and the objective trace (iterations × heads)."""
    unique = list(dict.fromkeys(keys))
    where = [unique.index(k) for k in keys]
    dev = z.device
    z = z.to(getattr(torch, settings.dtype))
    lam = torch.tensor([k[0] for k in unique], device=dev, dtype=z.dtype)
    smooth = torch.tensor([k[1] for k in unique], device=dev, dtype=z.dtype)
    res = solve_softmax_lbfgs(z, y, bank.num_classes, lam, smooth, settings=settings)
    idx = torch.as_tensor(where, device=dev)
    W, b = res.W.index_select(0, idx), res.b.index_select(0, idx)
    bank.set_linear(W.to(bank.weight.dtype), b.to(bank.bias.dtype))
    status = [
        {
            "solver": "lbfgs",
            "converged": bool(res.converged[u]),
            "steps": int(res.iterations[u]),
            "objective": float(res.objective[u]),
            "grad_max": float(res.grad_max[u]),
        }
        for u in where
    ]
    trace = res.trace.index_select(1, idx.to(res.trace.device)).tolist()
    return status, trace


def _known_solutions(
    fit: FitOutput | None, specs: Sequence[HeadSpec], cfg: TrainConfig
) -> dict[tuple[float, float], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    """``(λ, smoothing)`` → ``(W, b, status)`` of the plain L-BFGS heads of an earlier fit."""
    if fit is None:
        return {}
    return {
        _plain_key(spec, cfg): (fit.bank.weight[h].detach(), fit.bank.bias[h].detach(), st)
        for h, (spec, st) in enumerate(zip(specs, fit.status, strict=True))
        if spec.aug == "none" and st.get("solver") == "lbfgs"
    }


def fit_bank(
    features: FeatureSet,
    specs: Sequence[HeadSpec],
    cfg: TrainConfig,
    *,
    val_split: str | None = "val",
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    plain_solutions: FitOutput | None = None,
    plain_specs: Sequence[HeadSpec] = (),
) -> FitOutput:
    """Train one bank on ``features``' train split to convergence (module docstring); score every
    head on ``val_split`` when given. ``plain_solutions``: an earlier fit of ``plain_specs`` on
    the same rows and settings; its preconditioning affine is reused, and heads whose
    ``(λ, smoothing)`` it solved start from its weights instead of a new L-BFGS solve."""
    device = torch.device(cfg.device)
    if features.device != device:
        raise InputError(
            f"features are on {features.device} but TrainConfig.device is {device}; "
            "build the FeatureSet with the same device"
        )
    H, C, D = len(specs), features.num_classes, features.dim
    bank = HeadBank(H, D, C, seeds=[s.seed for s in specs], device=device)
    reuse = plain_solutions is not None and not cfg.train_layer_norm  # a frozen, shared affine
    if reuse and plain_solutions.bank.num_heads:  # same rows: the same standardizing affine
        gamma = plain_solutions.bank.ln_weight[0].detach().clone()
        beta = plain_solutions.bank.ln_bias[0].detach().clone()
    elif cfg.precondition:
        gamma, beta = standardizing_affine(features, "train")
    else:
        gamma, beta = torch.ones(D, device=device), torch.zeros(D, device=device)
    bank.set_layer_norm(gamma, beta)
    bank.freeze_layer_norm(not cfg.train_layer_norm)
    space = _Space(gamma, beta)
    keys = [_plain_key(s, cfg) for s in specs]
    smoothing = torch.tensor([k[1] for k in keys], device=device)
    in_memory = "train" in features.splits
    if cfg.solver == "lbfgs" and not in_memory:
        raise InputError(
            "solver 'lbfgs' needs the train split in memory, but it is streamed; use solver "
            "'auto' or 'minibatch'"
        )
    curves: dict[str, list[list[float]]] = {"lbfgs_objective": []}
    status: list[dict[str, Any]] = [{} for _ in specs]
    use_lbfgs = cfg.solver != "minibatch" and in_memory
    known = _known_solutions(plain_solutions, plain_specs, cfg)
    if cfg.solver != "minibatch" and all(k in known for k in keys):  # solved: no second solve
        for h, k in enumerate(keys):
            bank.set_head_linear(h, *known[k][:2])
            status[h] = dict(known[k][2])
    elif cfg.solver != "minibatch":  # in memory: the solution; streamed: a warm start
        if in_memory:
            X, y = features.get("train").X, features.get("train").y
        else:  # a class-stratified sample (the first rows of each class)
            per_class = max(1, cfg.warm_start_rows // C)
            X, y = features.fit_sample("train", max_per_class=per_class, seed=cfg.seed)
        with torch.no_grad():
            z = space.to_z(bank.normalize(X))
        status, curves["lbfgs_objective"] = _lbfgs_plain(bank, z, y, keys, cfg.lbfgs)
        del z, X, y
    minibatch = [
        h for h, s in enumerate(specs) if not use_lbfgs or s.aug != "none" or cfg.train_layer_norm
    ]
    val = features.get(val_split) if val_split else None
    diagnostics: list[dict[int, dict[str, float]]] = []
    epochs_run = 0
    if minibatch:
        sub = bank.subset(minibatch)
        run = _MinibatchRun(
            features, sub, [specs[h] for h in minibatch], smoothing[minibatch], cfg, space
        )
        sub_status, sub_curves, diagnostics, epochs_run = run.fit(val, on_epoch)
        bank.assign(minibatch, sub)
        for j, h in enumerate(minibatch):
            status[h] = sub_status[j]
        for key, per_epoch in sub_curves.items():
            full = []
            for row in per_epoch:
                wide = [math.nan] * H
                for j, h in enumerate(minibatch):
                    wide[h] = row[j]
                full.append(wide)
            curves[key] = full
        diagnostics = [{minibatch[j]: d for j, d in epoch.items()} for epoch in diagnostics]
    out_val: list[dict[str, Any]] = []
    if val is not None:
        m = evaluate_bank(bank, val, batch_size=cfg.eval_batch_size)
        for h in range(H):
            out_val.append(
                {
                    "balanced_accuracy": float(m["balanced_accuracy"][h]),
                    "accuracy": float(m["accuracy"][h]),
                    "loss": float(m["loss"][h]),
                    "rows": len(val),
                    **status[h],
                }
            )
    return FitOutput(bank, out_val, status, curves, diagnostics, epochs_run)


class _MinibatchRun:
    """The minibatch path over a bank of heads (see the module docstring, step 3)."""

    def __init__(
        self,
        features: FeatureSet,
        bank: HeadBank,
        specs: Sequence[HeadSpec],
        smoothing: torch.Tensor,
        cfg: TrainConfig,
        space: _Space,
    ) -> None:
        self.features, self.bank, self.specs, self.cfg, self.space = (
            features,
            bank,
            list(specs),
            cfg,
            space,
        )
        # None when no head smooths: cross_entropy then skips the smoothing term's operations
        self.smoothing = smoothing if bool((smoothing != 0).any()) else None
        device = bank.weight.device
        self.groups = _build_groups(specs, cfg, num_classes=bank.num_classes, device=device)
        _fit_augmentations(self.groups, features, bank, space, cfg.seed)
        self.lam = torch.tensor([s.weight_decay for s in specs], device=device)

    def fit(
        self, val: Split | None, on_epoch: Callable[[int, dict[str, Any]], None] | None
    ) -> tuple[list[dict[str, Any]], dict[str, list[list[float]]], list, int]:
        bank, cfg, H = self.bank, self.cfg, len(self.specs)
        device = bank.weight.device
        opt = BankOptimizer(bank, self.specs, optimizer=cfg.optimizer, momentum=cfg.momentum)
        n_train = self.features.num_rows("train")
        steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
        cfg = scale_for_min_steps(cfg, steps_per_epoch)
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        amp_dtype = _DTYPES[cfg.dtype]
        use_amp = amp_dtype != torch.float32
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        active = [True] * H
        converged = [False] * H
        history: list[list[float]] = [[] for _ in range(H)]
        curves: dict[str, list[list[float]]] = {
            "train_loss": [],
            "val_balanced_accuracy": [],
            "val_accuracy": [],
            "val_loss": [],
        }
        diagnostics: list[dict[int, dict[str, float]]] = []
        step = 0
        epochs_run = 0
        steps = [0] * H
        for epoch in range(cfg.epochs):
            aug_on = epoch >= cfg.aug_warmup_epochs
            loss_sum = torch.zeros(H, device=device, dtype=torch.float64)
            n_steps = 0
            running = torch.tensor(active, dtype=torch.float32, device=device)  # 0: stopped
            diag_acc: dict[int, dict[str, list[torch.Tensor]]] = {}
            for X, y in self.features.batches("train", cfg.batch_size, generator=shuffle_gen):
                mult = lr_at(
                    step,
                    total_steps=total_steps,
                    warmup_steps=warmup_steps,
                    min_ratio=cfg.min_lr_ratio,
                )
                opt.set_lr(opt.base_lr * (mult * running))
                amp = torch.autocast(device.type, dtype=amp_dtype) if use_amp else nullcontext()
                with amp:
                    losses = self._loss(X, y, aug_on, diag_acc, active)
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses.sum()).backward()
                scaler.step(opt)
                scaler.update()
                loss_sum += losses.detach().double()
                n_steps += 1
                step += 1
            for h in range(H):
                steps[h] += n_steps if active[h] else 0
            epochs_run = epoch + 1
            with torch.no_grad():
                l2 = 0.5 * self.lam.double() * bank.weight.detach().double().square().sum((1, 2))
            objective = (loss_sum / max(n_steps, 1) + l2).tolist()
            curves["train_loss"].append(objective)
            diagnostics.append(
                {
                    h: {k: float(torch.stack(v).float().mean()) for k, v in d.items()}
                    for h, d in diag_acc.items()
                }
            )
            for h in range(H):
                if not active[h]:
                    continue
                history[h].append(objective[h])
                if windowed_converged(history[h], tol=cfg.tol, window=cfg.window):
                    active[h], converged[h] = False, True
            if val is not None:
                m = evaluate_bank(bank, val, batch_size=cfg.eval_batch_size)
                for key in ("balanced_accuracy", "accuracy", "loss"):
                    curves[f"val_{key}"].append(m[key].tolist())
            logger.info("epoch %d: %d/%d minibatch heads still training", epoch, sum(active), H)
            if on_epoch is not None:
                report = {"train_loss": objective}
                if val is not None:
                    report["val_balanced_accuracy"] = curves["val_balanced_accuracy"][-1]
                on_epoch(epoch, report)
            if not any(active):
                break
        status = [
            {
                "solver": "minibatch",
                "converged": converged[h],
                "steps": steps[h],
                "objective": history[h][-1] if history[h] else math.nan,
            }
            for h in range(H)
        ]
        return status, curves, diagnostics, epochs_run

    def _smoothing(self, heads: torch.Tensor) -> torch.Tensor | None:
        """The label smoothing of ``heads`` (h,), or None when no head smooths."""
        return None if self.smoothing is None else self.smoothing[heads]

    def _loss(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        aug_on: bool,
        diag_acc: dict[int, dict[str, list[torch.Tensor]]],
        active: Sequence[bool],
    ) -> torch.Tensor:
        """Per-head training loss ``(H,)`` for one batch ``X (B, D)``, ``y (B,)`` (L2 is the
        optimizer's). Per-head augmentations skip heads that stopped (``active`` False)."""
        bank, smoothing = self.bank, self.smoothing
        xhat = bank.normalize(X)  # (B, D): once for all heads
        logits = bank.head_logits(xhat)  # (B, H, C): one matmul for all heads
        losses = cross_entropy(logits, y, smoothing)
        if not aug_on:
            return losses
        for g in self.groups:
            if g.per_head:
                losses = self._per_head_loss(g, X, y, xhat, logits, losses, diag_acc, active)
                continue
            aug = g.augs[0]
            out = aug(self.space.to_z(xhat), y, None, None, generator=g.generators[0])
            if len(out) == 0:
                continue
            x_aug = self.space.to_xhat(out.z)  # back to x̂: each head applies its own affine
            span = g.span
            la = bank.head_logits(x_aug, span) if span else bank.head_logits(x_aug)[:, g.index]
            ce = cross_entropy(la, out.y, self._smoothing(g.index), y_soft=out.y_soft)
            losses = losses.index_add(0, g.index, aug.aug_weight * ce)
        return losses

    def _per_head_loss(
        self,
        g: _Group,
        X: torch.Tensor,
        y: torch.Tensor,
        xhat: torch.Tensor,
        logits: torch.Tensor,
        losses: torch.Tensor,
        diag_acc: dict[int, dict[str, list[torch.Tensor]]],
        active: Sequence[bool],
    ) -> torch.Tensor:
        """``losses (H,)`` plus the group's augmented CE for a per-head augmentation (CARROT):
        each running head augments its own rows (its z, logits, weight, bias; margins read off
        the bank's logits with their rounding bound); the augmented rows of all of them go
        through ONE batched matmul (padded to the largest count, masked). Post-LN rows are
        ``z[source] + delta``, so their logits are ``logits[source] + W·delta`` (one product
        fewer each way than ``W z̃``); the violation rate is measured on those logits."""
        bank = self.bank
        run = [j for j, h in enumerate(g.heads) if active[h]]
        if not run:
            return losses
        idx = g.index[run] if len(run) < len(g.heads) else g.index
        W, b = bank.weight.detach(), bank.bias.detach()
        z = None if getattr(g.augs[0], "pre_ln", False) else bank.group_features(xhat, idx)
        err = None if z is None else bank.logits_error(xhat, z, idx)
        together = getattr(g.augs[0], "augment_heads", None)  # all of the group's heads at once
        if together is not None and err is not None:
            own = logits.detach().index_select(1, idx).transpose(0, 1)  # (h, B, C)
            gens = [g.generators[j] for j in run]
            out = together(z.detach(), y, own, W.index_select(0, idx), gens, err)
            if out is not None:
                return self._heads_loss(g, run, idx, y, logits, out, losses, diag_acc)
        outs = []
        for i, j in enumerate(run):
            aug, gen, h = g.augs[j], g.generators[j], g.heads[j]
            if z is None:  # noise on the raw x, then the head's LayerNorm
                ln = bank.layer_norm(h)
                out = aug(X, y, logits[:, h].detach(), W[h], generator=gen, ln=ln, bias=b[h])
            else:
                extra = {} if err is None else {"logits_error": err[i]}
                out = aug(z[i], y, logits[:, h].detach(), W[h], generator=gen, bias=b[h], **extra)
            if out.y_soft is not None:
                raise ValueError(f"per-head augmentation {aug.name!r} returned soft labels")
            outs.append(out)
        counts = [len(o) for o in outs]
        width = max(counts)
        heads = [g.heads[j] for j in run]
        if width == 0:
            self._record(diag_acc, heads, outs, None)
            return losses
        y_pad = torch.stack([F.pad(o.y, (0, width - len(o))) for o in outs])  # (h, M)
        if z is not None and all(o.delta is not None for o in outs):
            base = torch.stack(  # (h, M, C): each head's own logits of the source rows
                [
                    F.pad(logits[:, h].index_select(0, o.source), (0, 0, 0, width - len(o)))
                    for h, o in zip(heads, outs, strict=True)
                ]
            )
            delta = torch.stack([F.pad(o.delta, (0, 0, 0, width - len(o))) for o in outs])
            la = torch.baddbmm(base, delta, bank._take(bank.weight, idx).transpose(1, 2))
        else:
            rows = [o.z if z is not None else bank.normalize(o.z) for o in outs]
            pad = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])  # (h, M, D)
            if z is None:  # each head's affine on its augmented x̂ rows
                pad = bank.group_features(pad, idx)
            la = bank.group_logits(pad, idx)  # (h, M, C): one batched matmul
        mask = torch.arange(width, device=X.device)[:, None] < torch.tensor(counts, device=X.device)
        self._record(diag_acc, heads, outs, (la, y_pad, mask.t()))
        ce = cross_entropy(la.transpose(0, 1), y_pad.t(), self._smoothing(idx), mask=mask)
        weight = torch.tensor([g.augs[j].aug_weight for j in run], device=X.device)
        return losses.index_add(0, idx, weight * ce)

    def _heads_loss(
        self,
        g: _Group,
        run: Sequence[int],
        idx: torch.Tensor,
        y: torch.Tensor,
        logits: torch.Tensor,
        out: HeadsOutput,
        losses: torch.Tensor,
        diag_acc: dict[int, dict[str, list[torch.Tensor]]],
    ) -> torch.Tensor:
        """``losses (H,)`` plus the augmented CE of a group augmented all at once
        (:func:`~pipeline.augment.carrot_heads.carrot_augment_heads`): every row of every
        running head, ``logits + W·delta`` in one batched matmul, unaugmented rows masked."""
        copies = out.delta.shape[1] // y.shape[0]
        base = logits.index_select(1, idx).transpose(0, 1)  # (h, B, C), with gradient
        base = base.repeat(1, copies, 1) if copies > 1 else base
        la = torch.baddbmm(base, out.delta, self.bank._take(self.bank.weight, idx).transpose(1, 2))
        y_rows = y.repeat(copies)  # (a·B,) copy-major, as delta
        rates = violation_rate(la, y_rows.expand(len(run), -1), out.gamma, out.augmented)
        for i, j in enumerate(run):
            diag = {k: v[i] for k, v in out.diagnostics.items()}
            self._append(diag_acc, g.heads[j], diag | {"violation_rate": rates[i]}, y.device)
        ce = cross_entropy(la.transpose(0, 1), y_rows, self._smoothing(idx), mask=out.augmented.t())
        weight = torch.tensor([g.augs[j].aug_weight for j in run], device=y.device)
        return losses.index_add(0, idx, weight * ce)

    @classmethod
    def _record(
        cls,
        diag_acc: dict[int, dict[str, list[torch.Tensor]]],
        heads: Sequence[int],
        outs: Sequence[Any],
        measured: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Append each head's step diagnostics (no host sync); ``measured`` = the augmented
        logits (h, M, C), labels (h, M) and row mask (h, M) give the violation rates."""
        rates = None
        if measured is not None:  # one group: the same settings, so the same margin floor
            rates = violation_rate(*measured[:2], outs[0].gamma, measured[2])  # (h,)
        for i, (h, out) in enumerate(zip(heads, outs, strict=True)):
            diag = dict(out.diagnostics)
            if rates is not None and "frac_augmented" in diag:
                diag.setdefault("violation_rate", rates[i])
            cls._append(diag_acc, h, diag, out.y.device)

    @staticmethod
    def _append(
        diag_acc: dict[int, dict[str, list[torch.Tensor]]],
        h: int,
        diag: dict[str, Any],
        device: torch.device,
    ) -> None:
        """Append head ``h``'s numeric diagnostics of one step (detached tensors, no host sync)."""
        if not diag:
            return
        acc = diag_acc.setdefault(h, {})
        for k, v in diag.items():
            if isinstance(v, (int, float, torch.Tensor)):
                acc.setdefault(k, []).append(torch.as_tensor(v, device=device).detach())


# ----------------------------------------------------------------------------- entry point
# Balanced accuracies equal to this many digits are a tie: a mean of per-class recalls differs
# in its last float32 bits with the order of the classes whose recalls it sums (on the digits
# store three λ scored 0.716667 and the first one won by rounding, not by the loss rule)
ACCURACY_DIGITS = 6


def select_best(val: Sequence[dict[str, float]], augmented: Sequence[bool] | None = None) -> int:
    """Index of the head with the highest validation balanced accuracy (to ``ACCURACY_DIGITS``
    digits); ties → a head without augmentation (``augmented[h]`` False) → lowest validation
    loss → lowest index.

    An augmentation must earn its place beyond validation noise (the one-standard-error rule):
    when the scores carry their validation ``rows`` n, an augmented head is chosen over the best
    head without augmentation only if it beats that head's balanced accuracy p by more than
    ``√(p(1 − p)/n)``. Picking the best of twice as many heads on one noisy split otherwise
    favours the augmented half by chance alone."""
    aug = augmented if augmented is not None else [False] * len(val)

    def key(h: int) -> tuple:
        acc = round(float(val[h]["balanced_accuracy"]), ACCURACY_DIGITS)  # float noise is a tie
        return (-acc, bool(aug[h]), val[h]["loss"], h)

    best = min(range(len(val)), key=key)
    plain = [h for h in range(len(val)) if not aug[h]]
    if not aug[best] or not plain:
        return best
    top = min(plain, key=key)
    rows = val[top].get("rows")
    if not rows:
        return best
    p = float(val[top]["balanced_accuracy"])
    margin = math.sqrt(max(p * (1.0 - p), 0.0) / float(rows))
    return best if val[best]["balanced_accuracy"] > p + margin else top
