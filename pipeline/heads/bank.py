"""The classification head (LayerNorm + Linear) and a bank of H heads trained in one pass.

A `HeadBank` holds H heads over the same features as stacked parameters (``weight (H, C, D)``
and friends); per-head optimizer settings are vectors over the head axis (DINOv2's linear
evaluation gives each head a parameter group instead: 2·H groups). The forward pass is fast
because

* the LayerNorm *normalization* ``x̂ = (x - mean) / std`` is head-independent: it is computed once
  per batch; only the affine ``z_h = γ_h ⊙ x̂ + β_h`` differs per head;
* the affine folds into the linear layer: ``W_h z_h = (W_h diag γ_h) x̂ + W_h β_h``, so all heads'
  logits come out of ONE matmul ``x̂ (B, D) @ W'ᵀ (D, H·C)`` plus a bias ``(H·C,)``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.defaults import INIT_STD, LN_EPS
from pipeline.errors import InputError


class Head(nn.Module):
    """One head: ``LayerNorm(D, affine) → Linear(D, C)`` (with bias).

    ``forward(x (B, D) float32) -> logits (B, C)``; ``features(x) -> z (B, D)`` (post-LN).
    Trained heads carry their input preconditioning in the LayerNorm affine (γ = 1/σ, β = −μ/σ
    of the train split's normalized features), so a head file is self-contained.
    """

    def __init__(self, dim: int, num_classes: int, *, eps: float = LN_EPS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    @property
    def dim(self) -> int:
        return self.fc.in_features

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Post-LN features ``z (B, D)``."""
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


@dataclass(frozen=True)
class HeadSpec:
    """Settings of one head in a bank (one grid point)."""

    lr: float = 1e-3  # peak learning rate (after warm-up)
    weight_decay: float = 0.0  # decoupled (AdamW) / L2 (SGD) decay of the linear weight only
    aug: str = "none"  # augmentation name (see pipeline.augment.registry.augmentation_names())
    aug_settings: Any = None  # that augmentation's frozen settings object; None = its defaults
    label_smoothing: float | None = None  # None = TrainConfig.label_smoothing
    seed: int = 0  # seeds the head's initial weights (and its own augmentation noise)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InputError(f"head lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise InputError(f"head weight_decay must be >= 0, got {self.weight_decay}")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def aug_key(self) -> tuple[str, Any]:
        """Heads with equal keys share one augmentation group."""
        return (self.aug, self.aug_settings)

    @property
    def name(self) -> str:
        """Short readable label, e.g. ``lr=0.001 wd=0 aug=carrot``."""
        parts = [f"lr={self.lr:g}", f"wd={self.weight_decay:g}", f"aug={self.aug}"]
        if self.label_smoothing:
            parts.append(f"ls={self.label_smoothing:g}")
        if self.seed:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (settings as a dict of their fields)."""
        d = dataclasses.asdict(dataclasses.replace(self, aug_settings=None))
        s = self.aug_settings
        d["aug_settings"] = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadSpec:
        """Inverse of `to_dict` (rebuilds the settings object through the registry)."""
        from pipeline.augment.registry import settings_from_dict

        d = dict(d)
        d["aug_settings"] = settings_from_dict(d.get("aug", "none"), d.get("aug_settings"))
        return cls(**d)


@dataclass(frozen=True)
class HeadGrid:
    """The grid of heads as data: one `HeadSpec` per head."""

    specs: tuple[HeadSpec, ...]

    def __post_init__(self) -> None:
        if not self.specs:
            raise InputError("the head grid is empty; give at least one lr")

    @classmethod
    def from_lists(
        cls,
        *,
        lrs: Sequence[float],
        weight_decays: Sequence[float] = (0.0,),
        augmentations: Sequence[tuple[str, Any]] = (("none", None),),
        label_smoothings: Sequence[float | None] = (None,),
        seeds: Sequence[int] = (0,),
    ) -> HeadGrid:
        """Cartesian product lr × weight decay × augmentation × label smoothing × seed."""
        specs = tuple(
            HeadSpec(lr=lr, weight_decay=wd, aug=aug, aug_settings=st, label_smoothing=ls, seed=s)
            for (aug, st), lr, wd, ls, s in itertools.product(
                augmentations, lrs, weight_decays, label_smoothings, seeds
            )
        )
        return cls(specs)

    @classmethod
    def default(cls, *, augmentations: Sequence[tuple[str, Any]] = (("none", None),)) -> HeadGrid:
        """The default grid (`pipeline.defaults`): every lr × λ per augmentation."""
        from pipeline.defaults import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS

        return cls.from_lists(
            lrs=DEFAULT_LRS, weight_decays=DEFAULT_WEIGHT_DECAYS, augmentations=augmentations
        )

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[HeadSpec]:
        return iter(self.specs)

    def __getitem__(self, i: int) -> HeadSpec:
        return self.specs[i]

    def groups(self) -> dict[tuple[str, Any], list[int]]:
        """Head indices grouped by augmentation setting (insertion order)."""
        out: dict[tuple[str, Any], list[int]] = {}
        for i, spec in enumerate(self.specs):
            out.setdefault(spec.aug_key, []).append(i)
        return out


class _Workspace:
    """Reusable scratch tensors by shape. Fresh multi-MB CPU allocations page-fault on every
    step (measured: an out-of-place ``(16, 200, 768)`` multiply took 10x its in-place time), so
    the bank's temporaries live here. Only for values consumed within one forward or backward.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.affine_key: tuple | None = None  # what `HeadBank._shared_affine` last looked at
        self.affine_shared = False

    def get(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf


class _BankLogits(torch.autograd.Function):
    """All heads' logits in one matmul, with a hand-written backward that touches the
    ``(H, C, D)`` weights as few times as possible.

    ``x̂ (B, D)``, ``W (H, C, D)``, ``γ (H, D)``, ``β (H, D)``, bias ``c (H, C)`` → logits
    ``(B, H·C)`` with ``logits[:, h·C + k] = Σ_d W[h, k, d] (γ[h, d] x̂[b, d] + β[h, d]) + c[h, k]``.
    Under autocast the two big matmuls run in the autocast dtype; everything else in float32.
    """

    @staticmethod
    def forward(ctx, xhat, W, g, b, c, ws):  # type: ignore[override]
        H, C, D = W.shape
        keep_wp = ctx.needs_input_grad[0]  # backward needs W' only for the gradient of x̂
        tmp = ws.get(W) if ws is not None else torch.empty_like(W)
        bias = torch.mul(W, b[:, None, :], out=tmp).sum(-1).view(H * C)  # (H*C,): W_h β_h
        bias = bias + c.reshape(H * C)
        Wp = W * g[:, None, :] if keep_wp else torch.mul(W, g[:, None, :], out=tmp)  # W ⊙ γ
        dt = _autocast_dtype(xhat)
        if dt is not None:
            out = torch.addmm(bias.to(dt), xhat.to(dt), Wp.view(H * C, D).t().to(dt)).float()
        else:
            out = torch.addmm(bias, xhat, Wp.view(H * C, D).t())
        ctx.save_for_backward(xhat, W, g, b, Wp if keep_wp else None)
        ctx.mm_dtype = dt
        ctx.ws = ws
        return out

    @staticmethod
    def backward(ctx, G):  # type: ignore[override]
        xhat, W, g, b, Wp = ctx.saved_tensors
        H, C, D = W.shape
        dt = ctx.mm_dtype
        gx = gW = gg = gb = gc = None
        gbias = G.sum(0).view(H, C)  # (H, C)
        if ctx.needs_input_grad[4]:
            gc = gbias
        if ctx.needs_input_grad[0]:
            gx = (G.to(dt) @ Wp.view(H * C, D).to(dt)).float() if dt else G @ Wp.view(H * C, D)
        if any(ctx.needs_input_grad[1:4]):
            if dt is not None:
                gWp = (G.t().to(dt) @ xhat.to(dt)).float().view(H, C, D)
            else:
                gWp = (G.t() @ xhat).view(H, C, D)  # (H, C, D): the only fresh big tensor
            if ctx.needs_input_grad[2]:
                tmp = ctx.ws.get(W) if ctx.ws is not None else torch.empty_like(W)
                gg = torch.mul(gWp, W, out=tmp).sum(1)  # (H, D): Σ_c gWp·W
            if ctx.needs_input_grad[3]:
                gb = torch.bmm(gbias[:, None, :], W).view(H, D)  # (H, D): Σ_c gbias·W
            if ctx.needs_input_grad[1]:
                gW = gWp.mul_(g[:, None, :]).addcmul_(gbias[:, :, None], b[:, None, :])
        return gx, gW, gg, gb, gc, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        dt = torch.get_autocast_dtype(kind)
        return None if dt == torch.float32 else dt
    return None


class HeadBank(nn.Module):
    """H heads ``LayerNorm(D) + Linear(D, C)`` trained at once over shared feature batches.

    Parameters are stacked: ``weight (H, C, D)``, ``bias (H, C)``, ``ln_weight (H, D)``,
    ``ln_bias (H, D)``. Per-head settings (learning rate, weight decay) are vectors over the
    leading head axis (`pipeline.heads.optim.BankOptimizer`), not parameter groups; a group of
    heads is an index into that axis (`group_features`, `group_logits`).
    """

    def __init__(
        self,
        num_heads: int,
        dim: int,
        num_classes: int,
        *,
        seeds: Sequence[int] | None = None,
        eps: float = LN_EPS,
        init_std: float = INIT_STD,
        device: str | torch.device = "cpu",
        _blank: bool = False,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim < 1 or num_classes < 2:
            raise InputError(
                f"need num_heads >= 1, dim >= 1, num_classes >= 2; got "
                f"{num_heads}, {dim}, {num_classes}"
            )
        seeds = list(seeds) if seeds is not None else list(range(num_heads))
        if len(seeds) != num_heads:
            raise InputError(f"{len(seeds)} seeds given for {num_heads} heads")
        self.num_heads, self.dim, self.num_classes, self.eps = num_heads, dim, num_classes, eps
        dev = torch.device(device)
        if _blank:  # the caller copies weights in (`_of`): no draw to throw away
            W = torch.empty(num_heads, num_classes, dim, device=dev)
        else:  # init on the CPU with one seeded generator per head: the same on every device
            W = torch.stack(
                [
                    torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(int(s)))
                    * init_std
                    for s in seeds
                ]
            )
        self.weight = nn.Parameter(W.to(dev))  # (H, C, D)
        self.ln_weight = nn.Parameter(torch.ones(num_heads, dim, device=dev))  # (H, D)
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, dim, device=dev))  # (H, D)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes, device=dev))  # (H, C)
        self._workspace = _Workspace()

    _STACKED = ("weight", "bias", "ln_weight", "ln_bias")

    def __getstate__(self) -> dict[str, Any]:  # scratch buffers are not state
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_workspace"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._workspace = _Workspace()

    # ---------------------------------------------------------------- parameters
    def trainable(self) -> dict[str, nn.Parameter]:
        """The stacked parameters that train: ``weight`` (the one weight decay applies to),
        ``bias``, and the LayerNorm affine unless frozen (see `freeze_layer_norm`)."""
        names = self._STACKED if self.ln_weight.requires_grad else ("weight", "bias")
        return {name: getattr(self, name) for name in names}

    def freeze_layer_norm(self, frozen: bool = True) -> None:
        """Keep every head's LayerNorm affine fixed (no gradient) or let it train."""
        self.ln_weight.requires_grad_(not frozen)
        self.ln_bias.requires_grad_(not frozen)

    @torch.no_grad()
    def set_layer_norm(self, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        """Set every head's LayerNorm affine to ``gamma``/``beta`` ``(D,)`` (or ``(H, D)``)."""
        self.ln_weight.copy_(gamma.expand_as(self.ln_weight))
        self.ln_bias.copy_(beta.expand_as(self.ln_bias))

    @classmethod
    @torch.no_grad()
    def _of(cls, stacked: dict[str, torch.Tensor], *, eps: float, frozen: bool) -> HeadBank:
        """A bank holding copies of the stacked tensors (``weight (H, C, D)`` and the rest)."""
        H, C, D = stacked["weight"].shape
        out = cls(H, D, C, eps=eps, device=stacked["weight"].device, _blank=True)
        for name in cls._STACKED:
            getattr(out, name).copy_(stacked[name])
        out.freeze_layer_norm(frozen)
        return out

    def subset(self, heads: Sequence[int]) -> HeadBank:
        """A new bank holding copies of ``heads`` (same device, LayerNorm frozen or not)."""
        idx = torch.as_tensor(list(heads), dtype=torch.int64, device=self.weight.device)
        stacked = {name: getattr(self, name).index_select(0, idx) for name in self._STACKED}
        return self._of(stacked, eps=self.eps, frozen=not self.ln_weight.requires_grad)

    @classmethod
    def cat(cls, banks: Sequence[HeadBank]) -> HeadBank:
        """One bank holding the heads of ``banks`` in order (same D, C, device)."""
        stacked = {name: torch.cat([getattr(b, name) for b in banks]) for name in cls._STACKED}
        first = banks[0]
        return cls._of(stacked, eps=first.eps, frozen=not first.ln_weight.requires_grad)

    @torch.no_grad()
    def assign(self, heads: Sequence[int], other: HeadBank) -> None:
        """Copy ``other``'s heads (in order) into this bank's ``heads``."""
        for j, h in enumerate(heads):
            for name in self._STACKED:
                getattr(self, name)[h].copy_(getattr(other, name)[j])

    @torch.no_grad()
    def set_head_linear(self, h: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set head ``h``'s linear layer: ``weight (C, D)``, ``bias (C,)``."""
        self.weight[h].copy_(weight)
        self.bias[h].copy_(bias)

    @torch.no_grad()
    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set every head's linear layer: ``weight (H, C, D)``, ``bias (H, C)``."""
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    # ---------------------------------------------------------------- forward
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Head-independent LayerNorm without affine: ``x (B, D) -> x̂ (B, D)``."""
        return F.layer_norm(x, (self.dim,), eps=self.eps)

    def head_logits(self, xhat: torch.Tensor, heads: slice | None = None) -> torch.Tensor:
        """``x̂ (B, D)`` → logits ``(B, h, C)`` (batch-major, contiguous) of the heads in
        ``heads`` (a slice; all by default), from one matmul.

        When every head's LayerNorm affine is frozen and the same (the default: one
        standardizing affine, `pipeline.heads.precondition`), the rows are normalized once,
        ``z = γ ⊙ x̂ + β`` (B, D), and the logits are ``z Wᵀ + c``: no ``W ⊙ γ`` or ``W β`` pass
        over the (h, C, D) weights forward and none backward (the weight gradient is the one
        product ``Gᵀ z``). Otherwise ``x̂ (W ⊙ γ)ᵀ + (W β + c)`` (:class:`_BankLogits`)."""
        sl = slice(None) if heads is None else heads
        W, c = self._take(self.weight, sl), self._take(self.bias, sl)
        if self._shared_affine():
            z = torch.addcmul(self.ln_bias[0].detach(), xhat, self.ln_weight[0].detach())
            dt = _autocast_dtype(xhat)
            flat_w, flat_c = W.reshape(-1, self.dim), c.reshape(-1)
            if dt is None:
                out = F.linear(z, flat_w, flat_c)
            else:
                with torch.autocast(xhat.device.type, enabled=False):
                    out = F.linear(z.to(dt), flat_w.to(dt), flat_c.to(dt)).float()
        else:
            g, b = self._take(self.ln_weight, sl), self._take(self.ln_bias, sl)
            out = _BankLogits.apply(xhat, W, g, b, c, self._workspace)  # (B, h*C)
        return out.view(xhat.shape[0], -1, self.num_classes)

    def _shared_affine(self) -> bool:
        """Whether every head's LayerNorm affine is frozen and equal to head 0's (rechecked
        only when the affine tensors were replaced or changed in place: their versions)."""
        g, b = self.ln_weight, self.ln_bias
        if g.requires_grad or b.requires_grad:
            return False
        ws = self._workspace
        key = (g.data_ptr(), g._version, b.data_ptr(), b._version, g.shape)
        if ws.affine_key != key:
            ws.affine_shared = bool(torch.equal(g, g[:1].expand_as(g))) and bool(
                torch.equal(b, b[:1].expand_as(b))
            )
            ws.affine_key = key
        return ws.affine_shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``x (B, D)`` → logits ``(H, B, C)`` (a transposed view)."""
        return self.head_logits(self.normalize(x)).transpose(0, 1)

    def group_features(self, xhat: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
        """Post-LN features ``z (h, B, D) = γ_g ⊙ x̂ + β_g`` of the heads ``heads`` (a slice or
        an index tensor) for shared rows ``x̂ (B, D)`` or per-head rows ``x̂ (h, B, D)``,
        differentiable w.r.t. their LayerNorm affine."""
        g, b = self._take(self.ln_weight, heads), self._take(self.ln_bias, heads)
        return torch.addcmul(b[:, None, :], xhat, g[:, None, :])

    def group_logits(self, z: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
        """Logits ``(h, M, C)`` of post-LN rows ``z (h, M, D)`` (row block j through head
        ``heads[j]``): one batched matmul, differentiable w.r.t. those heads' linear layers."""
        W, c = self._take(self.weight, heads), self._take(self.bias, heads)
        return torch.baddbmm(c[:, None, :], z, W.transpose(1, 2))

    @torch.no_grad()
    def logits_error(
        self, xhat: torch.Tensor, z: torch.Tensor, heads: torch.Tensor
    ) -> torch.Tensor | None:
        """(h, B, C) float64 bound on ``|head_logits(x̂) − (W z + c)|`` for the heads ``heads``
        and their post-LN rows ``z (h, B, D)`` (``group_features``), so CARROT can read margins
        off the logits the bank already computed; None when the bank's matmul is not IEEE
        float32/float64 (autocast, TF32), where margins must be recomputed.

        ``head_logits`` computes ``x̂ (W ⊙ γ)ᵀ + (W β + c)``: every product and sum is off by at
        most ``γ_n = n·u/(1 − n·u)`` times its absolute terms, so the error is at most
        ``γ_{D+6}·(‖x̂‖‖w_k ⊙ γ‖ + ‖w_k‖(‖β‖ + ‖z‖) + |c_k|)`` (the ‖z‖ term covers rounding z).
        With a shared frozen affine it computes ``fl(z) Wᵀ + c`` instead: rounding z moves a
        logit by ``u·‖z‖‖w_k‖``, the product by ``γ_{D+1}·(‖z‖‖w_k‖ + |c_k|)``, inside the same
        bound.
        """
        from pipeline.augment.nuisance import gemm_error_factor, ieee_matmul

        dt = self.weight.dtype
        if _autocast_dtype(xhat) is not None or not ieee_matmul(xhat.device, dt):
            return None
        d = xhat.shape[-1]
        W, g, b, c = (
            self._take(p.detach(), heads)
            for p in (self.weight, self.ln_weight, self.ln_bias, self.bias)
        )
        w_norm = W.norm(dim=2).double()  # (h, C)
        wg_norm = (W * g[:, None, :]).norm(dim=2).double()  # (h, C)
        x_norm = xhat.detach().norm(dim=-1).double()  # (B,)
        z_norm = z.detach().norm(dim=-1).double()  # (h, B)
        b_norm = b.norm(dim=1).double()  # (h,)
        up = (1 + gemm_error_factor(d, dt)) ** 2  # the norms' own rounding, up
        gamma = gemm_error_factor(d + 6, dt) * up
        rows = x_norm[None, :, None] * wg_norm[:, None, :]  # (h, B, C)
        rows += w_norm[:, None, :] * (b_norm[:, None, None] + z_norm[:, :, None])
        rows += c.double().abs()[:, None, :]
        return rows.mul_(gamma)

    @staticmethod
    def _take(param: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``heads`` of a stacked parameter (all of them: the parameter itself, so no
        SliceBackward copy)."""
        if isinstance(heads, slice):
            return param if heads == slice(None) else param[heads]
        return param.index_select(0, heads)

    # ---------------------------------------------------------------- single heads
    @torch.no_grad()
    def layer_norm(self, h: int) -> nn.LayerNorm:
        """A detached copy of head ``h``'s LayerNorm (for code that needs an ``nn.LayerNorm``)."""
        ln = nn.LayerNorm(self.dim, eps=self.eps).to(self.weight.device)
        ln.weight.copy_(self.ln_weight[h])
        ln.bias.copy_(self.ln_bias[h])
        return ln.requires_grad_(False)

    def head(self, h: int) -> Head:
        """Head ``h`` as a plain `Head` module (a copy, on the bank's device)."""
        head = Head(self.dim, self.num_classes, eps=self.eps).to(self.weight.device)
        head.load_state_dict(self.head_state(h))
        return head

    def head_state(self, h: int) -> dict[str, torch.Tensor]:
        """Detached copies of head ``h``'s tensors (keys as in `Head`'s state dict)."""
        return {
            "norm.weight": self.ln_weight[h].detach().clone(),
            "norm.bias": self.ln_bias[h].detach().clone(),
            "fc.weight": self.weight[h].detach().clone(),
            "fc.bias": self.bias[h].detach().clone(),
        }

    @torch.no_grad()
    def load_head_state(self, h: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a `head_state` dict into head ``h``."""
        self.ln_weight[h].copy_(state["norm.weight"])
        self.ln_bias[h].copy_(state["norm.bias"])
        self.weight[h].copy_(state["fc.weight"])
        self.bias[h].copy_(state["fc.bias"])
