"""Optimizers of the head bank's minibatch path, and its learning-rate schedule.

Weight decay means the same thing for every solver: the L2 term ``λ/2 · ‖W‖²`` of the training
objective (torch's *coupled* ``weight_decay``: ``λ·W`` is added to the gradient), applied to the
linear weight only — so a minibatch head and an L-BFGS head with the same ``λ`` minimize the same
objective, and ``λ = 1 / (C·N)`` is scikit-learn's ``C``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.heads.bank import HeadBank, HeadSpec


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


def create_optimizer(
    bank: HeadBank,
    specs: Sequence[HeadSpec],
    *,
    optimizer: str = "adam",
    impl: str = "auto",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """One optimizer, two parameter groups per head (linear weight with the head's L2 ``λ``;
    bias and, when trained, the LayerNorm affine without), tagged ``head=h``, ``base_lr``.

    ``impl``: ``"torch"`` = torch's Adam/SGD (fused kernels, one step per group: fastest on a
    CPU); ``"multi_tensor"`` = `MultiHeadAdam`/`MultiHeadSGD` (the same math, one multi-tensor
    step across all groups: a constant number of kernel launches however many heads — for
    CUDA); ``"auto"`` picks multi_tensor on CUDA, torch elsewhere.
    """
    groups: list[dict[str, Any]] = []
    for h, spec in enumerate(specs):
        linear, rest = bank.head_parameters(h)
        common = {"lr": spec.lr, "base_lr": spec.lr, "head": h}
        groups.append({"params": linear, "weight_decay": spec.weight_decay, **common})
        groups.append({"params": rest, "weight_decay": 0.0, **common})
    device = bank.weight.device
    if impl == "auto":
        impl = "multi_tensor" if device.type == "cuda" else "torch"
    if impl == "multi_tensor":
        if optimizer == "sgd":
            return MultiHeadSGD(groups, lr=specs[0].lr, momentum=momentum)
        return MultiHeadAdam(groups, lr=specs[0].lr)
    fused = True if device.type in ("cpu", "cuda") else None
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=specs[0].lr, momentum=momentum, fused=fused)
    return torch.optim.Adam(groups, lr=specs[0].lr, fused=fused)


class MultiHeadAdam(torch.optim.Optimizer):
    """torch's Adam (coupled L2 weight decay, bias-corrected moments, no amsgrad) stepping ALL
    parameter groups with one set of ``torch._foreach_*`` calls, each group's lr and weight decay
    passed as per-tensor scalars. Groups must share betas and eps."""

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
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
                raise ValueError("MultiHeadAdam needs the same betas and eps in every group")
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
                decay.append(wd)
                step_size.append(-lr / (1.0 - b1**t))
                bc2_sqrt.append(math.sqrt(1.0 - b2**t))
        if not ps:
            return loss
        gs = torch._foreach_add(gs, torch._foreach_mul(ps, decay))  # grad + λ·param
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
