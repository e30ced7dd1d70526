"""Full-batch L-BFGS for H independent L2-regularized softmax regressions, batched over heads.

Each head h minimizes its own convex objective over the same rows ``x̂ (N, D)``::

    f_h(W_h, b_h) = mean_i CE_s(W_h x̂_i + b_h, y_i) + λ_h / 2 · ‖W_h‖²

(``CE_s``: cross-entropy with label smoothing ``s_h``; the bias is not penalized) — exactly
scikit-learn's multinomial ``LogisticRegression`` objective with ``C = 1 / (λ N)``. The heads are
separable, so every head runs its own L-BFGS (own history, own backtracking line search, own
stopping test) while one batched evaluation computes all active heads' losses and gradients:
one ``(n, D) @ (D, h·C)`` matmul per block of rows, gradients in closed form (no autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.defaults import HISTORY_BYTES, LbfgsSettings

ARMIJO_C1 = 1e-4
MAX_BACKTRACKS = 30
BLOCK_ELEMENTS = 1 << 22  # rows per block × H × C kept under this (logits memory)
DROP_BELOW = 0.01  # the preconditioner keeps Σ's eigen-directions with eigenvalue > this × κ


@dataclass
class LbfgsResult:
    """Per-head solution and how the solve ended. ``W (H, C, D)``, ``b (H, C)``; the rest ``(H,)``."""

    W: torch.Tensor
    b: torch.Tensor
    objective: torch.Tensor  # float64 final f_h
    grad_max: torch.Tensor  # float64 final max |∇f_h|
    iterations: torch.Tensor  # int64
    converged: torch.Tensor  # bool: gradient or decrease test met (not the iteration cap)
    trace: torch.Tensor  # (iterations + 1, H) float64 objective per iteration, NaN once stopped


def softmax_objective(
    xhat: torch.Tensor,
    y: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    lam: torch.Tensor,
    smoothing: torch.Tensor,
    *,
    with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``f (h,) float64`` and, with ``with_grad``, ``∇W (h, C, D)``, ``∇b (h, C)``.

    ``xhat (N, D)``, ``y (N,) int64``, ``W (h, C, D)``, ``b (h, C)``, ``lam``/``smoothing (h,)``.
    Rows are processed in blocks so the ``(n, h, C)`` logits stay small.
    """
    n_rows, dim = xhat.shape
    h, C, _ = W.shape
    Wf = W.reshape(h * C, dim)
    bf = b.reshape(h * C)
    s = smoothing.to(W.dtype)[None, :, None]  # (1, h, 1)
    smoothed = bool((smoothing != 0).any())
    block = max(1, BLOCK_ELEMENTS // max(1, h * C))
    loss = torch.zeros(h, dtype=torch.float64, device=W.device)
    gW = torch.zeros_like(Wf) if with_grad else None
    gb = torch.zeros_like(bf) if with_grad else None
    for start in range(0, n_rows, block):
        xb, yb = xhat[start : start + block], y[start : start + block]
        logits = torch.addmm(bf, xb, Wf.t()).view(-1, h, C)  # (n, h, C)
        # log-softmax by hand: torch's kernel is 3x slower on a short class dimension (C ~ 10)
        shifted = logits.sub_(logits.amax(-1, keepdim=True))
        e = shifted.exp()
        z = e.sum(-1)  # (n, h)
        log_z = z.log()
        label = yb.view(-1, 1, 1).expand(-1, h, 1)
        nll = log_z - shifted.gather(-1, label).squeeze(-1)  # (n, h)
        rows = nll
        if smoothed:  # − mean_c log p_c = log z − mean_c shifted_c
            rows = (1 - s[..., 0]) * nll + s[..., 0] * (log_z - shifted.mean(-1))
        loss += rows.sum(0, dtype=torch.float64)
        if with_grad:
            G = e.div_(z[..., None])  # softmax: (n, h, C)
            if smoothed:
                G.sub_(s / C)
            G.scatter_add_(-1, label, (s[..., 0] - 1).expand(len(yb), h)[..., None])
            G = G.view(-1, h * C)
            gW.addmm_(G.t(), xb)
            gb.add_(G.sum(0))
    f = loss / n_rows + 0.5 * lam.double() * W.double().square().sum((1, 2))
    if not with_grad:
        return f, None, None
    gW = gW.view(h, C, dim).div_(n_rows).add_(W * lam.to(W.dtype)[:, None, None])
    return f, gW, gb.view(h, C).div_(n_rows)


def _flat(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([W.flatten(1), b], dim=1)  # (h, C·D + C)


def _unflat(theta: torch.Tensor, C: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = theta.shape[0]
    return theta[:, : C * D].reshape(h, C, D), theta[:, C * D :]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row dot products ``(h,)`` in float64 (one kernel when the rows already are)."""
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        return torch.linalg.vecdot(a, b)
    return (a.double() * b.double()).sum(1)


@dataclass(frozen=True)
class CovariancePreconditioner:
    """``M = (Σ + κ I)⁻¹`` on each class row of ``W`` (identity on the bias), ``Σ = x̂ᵀx̂ / N``:
    the initial inverse-Hessian of L-BFGS. Cached features are strongly correlated, and plain
    L-BFGS crawls along their low-variance directions (measured on digits stores of random-init
    ResNet-18, ConvNeXt-atto and ViT-tiny: 5–10× fewer iterations, and lower objectives where the
    gradient test had stopped plain L-BFGS in a flat valley). Kept as ``V (D, r)`` and the
    eigenvalues, ``r ≤ min(N, D)`` (those above ``DROP_BELOW·κ``):
    ``M q = q/κ + ((q V) ⊙ (1/(e+κ) − 1/κ)) Vᵀ``, O(r·D) per row.
    The objective is unchanged: only the path to its optimum."""

    V: torch.Tensor  # (D, r) orthonormal eigenvectors of Σ
    coef: torch.Tensor  # (r,) 1/(e + κ) − 1/κ
    inv_kappa: float

    @classmethod
    def fit(cls, xhat: torch.Tensor, kappa: float) -> CovariancePreconditioner:
        """From rows ``xhat (N, D)`` (already standardized, so κ is relative to unit variance)."""
        n, d = xhat.shape
        X = xhat.double()
        if n >= d:
            e, V = torch.linalg.eigh(X.T @ X / n)
        else:  # rank ≤ N: eigenvectors of Σ from the N × N Gram
            e, U = torch.linalg.eigh(X @ X.T / n)
            keep = e > 1e-12 * max(float(e.max()), 1e-300)
            e, U = e[keep], U[:, keep]
            V = X.T @ U / torch.sqrt(n * e)
        e = e.clamp_min(0.0)
        # dropping the directions with e ≤ ε·κ raises M there by a factor ≤ 1 + ε (1/κ for
        # 1/(e + κ)): the path barely changes and M costs a fraction (the spectrum of cached
        # features falls fast: 100 of 512 directions kept on the digits/resnet18 store)
        keep = e > DROP_BELOW * kappa
        e, V = e[keep], V[:, keep]
        coef = 1.0 / (e + kappa) - 1.0 / kappa
        return cls(V.to(xhat.dtype), coef.to(xhat.dtype), 1.0 / kappa)

    def apply(self, theta: torch.Tensor, C: int, D: int) -> torch.Tensor:
        """``M`` applied to flat parameters ``theta (h, C·D + C)`` (a new tensor)."""
        W, b = _unflat(theta, C, D)
        MW = W * self.inv_kappa + ((W @ self.V) * self.coef) @ self.V.T
        return _flat(MW, b)

    def quadratic(self, theta: torch.Tensor, C: int, D: int) -> torch.Tensor:
        """``θᵀ M θ`` per head ``(h,)`` float64 for flat ``theta (h, C·D + C)``: one product."""
        W, b = _unflat(theta, C, D)
        WV = W @ self.V  # (h, C, r)
        quad = W.square().sum((1, 2)) * self.inv_kappa + (WV.square() * self.coef).sum((1, 2))
        return quad.double() + b.double().square().sum(1)


def solve_softmax_lbfgs(
    xhat: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lam: torch.Tensor,
    smoothing: torch.Tensor | None = None,
    *,
    settings: LbfgsSettings | None = None,
    W0: torch.Tensor | None = None,
    b0: torch.Tensor | None = None,
) -> LbfgsResult:
    """Minimize every head's ``f_h`` (module docstring) from ``W0``/``b0`` (default zeros).

    ``xhat (N, D)`` float32 or float64 on the solve's device, ``y (N,)``, ``lam (H,)`` ≥ 0,
    ``smoothing (H,)`` in [0, 1). Heads stop independently: on the gradient test, or when
    ``ftol_streak`` consecutive steps each lowered ``f`` by at most ``ftol`` relative; a head
    whose line search cannot
    decrease ``f`` any more (float precision reached) stops and is reported converged only if
    its gradient test holds within 10×.
    """
    cfg = settings if settings is not None else LbfgsSettings()
    dev, dt = xhat.device, xhat.dtype
    pre = None
    if cfg.precondition_kappa is not None:
        pre = CovariancePreconditioner.fit(xhat, cfg.precondition_kappa)
    H, C, D = int(lam.shape[0]), int(num_classes), int(xhat.shape[1])
    lam = lam.to(dev, dt)
    smoothing = torch.zeros(H, device=dev, dtype=dt) if smoothing is None else smoothing.to(dev, dt)
    W = torch.zeros(H, C, D, device=dev, dtype=dt) if W0 is None else W0.to(dev, dt).clone()
    b = torch.zeros(H, C, device=dev, dtype=dt) if b0 is None else b0.to(dev, dt).clone()
    y = y.to(dev)
    P = C * D + C
    per_pair = 2 * H * P * xhat.element_size()
    m = max(3, min(cfg.history, HISTORY_BYTES // max(1, per_pair)))
    theta = _flat(W, b)
    f, gW, gb = softmax_objective(xhat, y, W, b, lam, smoothing)
    g = _flat(gW, gb)
    iters = torch.zeros(H, dtype=torch.int64, device=dev)
    done = g.abs().amax(1).double() <= cfg.gtol
    converged = done.clone()
    trace = [f.clone()]
    # the state of the running heads only, compacted once whenever some stop (the running set
    # only shrinks): no per-iteration gathers of the (m, h, P) history
    alive = torch.nonzero(~done).squeeze(1)
    ta, ga, fa = theta[alive], g[alive], f[alive]
    lam_a, s_a = lam[alive], smoothing[alive]
    S = torch.zeros(m, len(alive), P, device=dev, dtype=dt)
    Y = torch.zeros_like(S)
    rho = torch.zeros(m, len(alive), dtype=torch.float64, device=dev)
    gamma = torch.ones(len(alive), dtype=torch.float64, device=dev)
    streak = torch.zeros(len(alive), dtype=torch.int64, device=dev)  # consecutive small steps
    for it in range(cfg.max_iter):
        if alive.numel() == 0:
            break
        # two-loop recursion over the ring buffer (entries with ρ = 0 are no-ops)
        q = ga.clone()
        order = [(it - 1 - j) % m for j in range(min(it, m))]
        alphas = []
        for i in order:
            a = rho[i] * _dot(S[i], q)
            q.addcmul_(Y[i], a.to(dt)[:, None], value=-1)
            alphas.append(a)
        if pre is not None:
            q = pre.apply(q, C, D)
        r = q.mul_(gamma.to(dt)[:, None])
        for i, a in zip(reversed(order), reversed(alphas), strict=True):
            beta = rho[i] * _dot(Y[i], r)
            r.addcmul_(S[i], (a - beta).to(dt)[:, None])
        d = r.neg_()
        slope = _dot(ga, d)
        bad = ~(slope < 0) | ~torch.isfinite(slope)
        if bad.any():  # not a descent direction: fall back to steepest descent
            d[bad] = -ga[bad]
            slope = torch.where(bad, -_dot(ga, ga), slope)
        step = torch.ones(len(alive), dtype=torch.float64, device=dev)
        if it == 0:
            step = (1.0 / d.norm(dim=1).double().clamp_min(1e-12)).clamp_max(1.0)
        accepted = torch.zeros(len(alive), dtype=torch.bool, device=dev)
        new_theta, fn, gn = ta.clone(), fa.clone(), ga.clone()
        for _ in range(MAX_BACKTRACKS):
            todo = torch.nonzero(~accepted).squeeze(1)
            every = len(todo) == len(alive)
            t_todo, d_todo = (ta, d) if every else (ta[todo], d[todo])
            trial = torch.addcmul(t_todo, step[todo].to(dt)[:, None], d_todo)
            Wt, bt = _unflat(trial, C, D)
            lam_t, s_t = (lam_a, s_a) if every else (lam_a[todo], s_a[todo])
            ft, gWt, gbt = softmax_objective(xhat, y, Wt, bt, lam_t, s_t)
            ok = torch.isfinite(ft) & (ft <= fa[todo] + ARMIJO_C1 * step[todo] * slope[todo])
            hit = todo[ok]
            new_theta[hit], fn[hit], gn[hit] = trial[ok], ft[ok], _flat(gWt, gbt)[ok]
            accepted[hit] = True
            if accepted.all():
                break
            step = torch.where(accepted, step, step * 0.5)
        stalled = ~accepted
        s_vec, y_vec = new_theta - ta, gn - ga
        sy = _dot(s_vec, y_vec)
        good = sy > 1e-12 * _dot(y_vec, y_vec).clamp_min(1e-300)
        slot = it % m
        S[slot] = s_vec.mul_(good.to(dt)[:, None])
        Y[slot] = y_vec.mul_(good.to(dt)[:, None])
        rho[slot] = torch.where(good, 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        yy = pre.quadratic(Y[slot], C, D) if pre is not None else _dot(Y[slot], Y[slot])  # yᵀMy
        gamma = torch.where(good, sy / yy.clamp_min(1e-300), gamma)
        gmax = gn.abs().amax(1).double()
        small_g = gmax <= cfg.gtol
        small_f = (fa - fn) <= cfg.ftol * torch.maximum(fn.abs(), torch.ones_like(fn))
        streak = torch.where(small_f & accepted, streak + 1, 0)
        flat_f = streak >= cfg.ftol_streak
        stop = small_g | flat_f | stalled
        ta, ga, fa = new_theta, gn, fn
        theta[alive], g[alive], f[alive] = ta, ga, fa
        iters[alive] += 1
        converged[alive] = small_g | flat_f | (stalled & (gmax <= 10 * cfg.gtol))
        trace.append(torch.where(iters == it + 1, f, torch.full_like(f, math.nan)))
        if bool(stop.any()):  # compact the running set's state once
            keep = torch.nonzero(~stop).squeeze(1)
            alive = alive[keep]
            ta, ga, fa, lam_a, s_a = ta[keep], ga[keep], fa[keep], lam_a[keep], s_a[keep]
            S, Y = S.index_select(1, keep), Y.index_select(1, keep)
            rho, gamma, streak = rho.index_select(1, keep), gamma[keep], streak[keep]
    W, b = _unflat(theta, C, D)
    return LbfgsResult(
        W=W.contiguous(),
        b=b.contiguous(),
        objective=f,
        grad_max=g.abs().amax(1).double(),
        iterations=iters,
        converged=converged,
        trace=torch.stack(trace),
    )


def lambda_from_C(C: float, n_rows: int) -> float:
    """The λ of :func:`softmax_objective` equal to scikit-learn's ``C`` on ``n_rows`` rows."""
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"C must be positive and finite, got {C}")
    return 1.0 / (C * n_rows)
