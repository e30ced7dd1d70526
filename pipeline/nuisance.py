"""Nuisance-subspace geometry for CARROT: competitor sets, projections and noise variances.

Notation (see docs/CARROT.md): ``W`` (C, D) head weight, ``d_c = w_y − w_c``, competitor set
``Kset`` (K classes), ``A = [d_k]_{k∈Kset}`` (K, D), ``S = span(A)``, ``P_N = I − P_S``.

Everything here runs in float64 on the weight's device and never builds a D×D matrix: ``S`` is
represented by ``A`` and ``G⁺`` (the rank-thresholded pseudo-inverse of the K×K Gram ``A Aᵀ``),
so ``P_S v = Aᵀ G⁺ A v``. Gram entries come from the C×C class Gram of the centred weight
(centring leaves every ``d_c`` unchanged and removes the cancellation of a shared offset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Eigenvalues of A Aᵀ below RTOL·λ_max are treated as zero (rank deficiency: duplicate or
# collinear competitors). This bounds the condition number of the kept part by RTOL^-1/2 = 1e5.
RTOL = 1e-10
# Relative uncertainty of the computed ‖P_S d‖² (eigh backward error amplified by ≤ 1/RTOL):
# nuisance variances are rounded UP by ETA·‖d‖², so α errs on the safe side.
_EPS64 = torch.finfo(torch.float64).eps
ETA_PER_COMPETITOR = 4 * _EPS64 / RTOL


@dataclass(frozen=True)
class Competitors:
    """Geometry of N rows (samples, or classes in "class" mode), float64 on one device.

    Per row: ``labels`` (N,) int64 own class y; ``kset`` (N, K) int64 competitors; ``pinv``
    (N, K, K) ``G⁺`` of ``A Aᵀ``; ``rank`` (N,) int64 numerical rank of ``A``;
    ``nuisance_var`` (N, C) ``s_c ≥ ‖P_N d_c‖²`` (rounded up; 0 where not outside);
    ``outside`` (N, C) bool, True for classes outside ``Kset ∪ {y}``.
    Shared: ``weight`` (C, D) the centred weight that defines ``A``.
    """

    labels: Tensor
    kset: Tensor
    pinv: Tensor
    rank: Tensor
    nuisance_var: Tensor
    outside: Tensor
    weight: Tensor

    def take(self, index: Tensor) -> Competitors:
        """Rows ``index`` (B,) of this geometry (e.g. the class geometry of each sample)."""
        rows = (self.labels, self.kset, self.pinv, self.rank, self.nuisance_var, self.outside)
        return Competitors(*(t.index_select(0, index) for t in rows), self.weight)


def centered_weight(weight: Tensor) -> Tensor:
    """Centred, detached float64 copy of ``weight`` (C, D); margins and every ``d_c`` unchanged."""
    w = weight.detach().to(torch.float64)
    return w - w.mean(dim=0, keepdim=True)


def nearest_classes(gram: Tensor, k: int) -> Tensor:
    """(C, K) int64: for each class, the K other classes with the nearest weights (Euclidean)."""
    diag = gram.diagonal()
    dist = diag[:, None] - 2 * gram + diag[None, :]  # (C, C) ‖w_i − w_j‖²
    dist.fill_diagonal_(float("inf"))
    return dist.nan_to_num(nan=float("inf")).topk(k, dim=1, largest=False).indices


def top_competitors(logits: Tensor, y: Tensor, k: int) -> Tensor:
    """(B, K) int64: the K highest logits of each row excluding its label ``y``."""
    masked = logits.detach().float().nan_to_num(nan=float("-inf")).clone()
    masked.scatter_(1, y[:, None], float("-inf"))
    return masked.topk(k, dim=1).indices


def competitor_geometry(wc: Tensor, gram: Tensor, labels: Tensor, kset: Tensor) -> Competitors:
    """Build :class:`Competitors` for rows with labels (N,) and competitor sets (N, K).

    ``wc`` comes from :func:`centered_weight`, ``gram`` = ``wc @ wc.T`` (C, C). Cost O(N·K·(D + C) + N·K³), no D×D.
    """
    n, k = kset.shape
    c, d = wc.shape
    y = labels
    g_yy = gram[y, y]  # (N,)
    g_yc = gram[y]  # (N, C)
    g_kc = gram[kset]  # (N, K, C)
    g_ky = g_yc.gather(1, kset)  # (N, K)
    # A Aᵀ: (N, K, K); (w_y − w_i)ᵀ(w_y − w_j) = g_yy − g_yj − g_iy + g_ij
    g_kk = g_kc.gather(2, kset[:, None, :].expand(n, k, k))
    gram_a = g_yy[:, None, None] - g_ky[:, None, :] - g_ky[:, :, None] + g_kk
    gram_a = 0.5 * (gram_a + gram_a.transpose(1, 2))
    lam, vec = torch.linalg.eigh(gram_a.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0))
    keep = lam > RTOL * lam[:, -1:].clamp_min(0)  # (N, K)
    rank = keep.sum(dim=1)
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
    whiten = vec * inv_sqrt[:, None, :]  # (N, K, K): columns v_i/√λ_i; G⁺ = whiten whitenᵀ
    pinv = whiten @ whiten.transpose(1, 2)
    # A d_c for every class c: (w_y − w_i)ᵀ(w_y − w_c) = g_ic − g_iy − (g_yc − g_yy) → (N, K, C)
    # (in place: fresh large temporaries cost page faults on CPU)
    cross = g_kc.sub_(g_ky[:, :, None]).sub_((g_yc - g_yy[:, None])[:, None, :])
    in_s = (whiten.transpose(1, 2) @ cross).square_().sum(dim=1)  # (N, C) ‖P_S d_c‖²
    diff_sq = difference_sq(gram, y, d)
    eta = ETA_PER_COMPETITOR * k
    nuisance = ((diff_sq - in_s).clamp_min(0) + eta * diff_sq).minimum(diff_sq)
    outside = outside_mask(y, kset, c)
    nuisance = torch.where(outside, nuisance, 0.0)
    return Competitors(y, kset, pinv, rank, nuisance, outside, wc)


def difference_sq(gram: Tensor, labels: Tensor, dim: int) -> Tensor:
    """(N, C) float64 upper bound of ``‖w_y − w_c‖²`` from the class Gram, for labels (N,).

    Each Gram entry (a sum of ``dim`` products) is off by at most dim·eps·‖w_a‖‖w_b‖ (we allow 4× that): the result is
    rounded up by that amount, so it never underestimates.
    """
    diag = gram.diagonal()
    norms = diag.clamp_min(0).sqrt()
    exact = gram[labels, labels][:, None] - 2 * gram[labels] + diag[None, :]
    slack = 4 * dim * _EPS64 * (norms[labels][:, None] + norms[None, :]).square()
    return exact.clamp_min(0) + slack


def outside_mask(labels: Tensor, kset: Tensor, num_classes: int) -> Tensor:
    """(N, C) bool: True for classes outside ``Kset ∪ {y}``."""
    outside = torch.ones(labels.shape[0], num_classes, dtype=torch.bool, device=labels.device)
    outside.scatter_(1, kset, False)
    return outside.scatter_(1, labels[:, None], False)


def project_out(geo: Competitors, v: Tensor) -> Tensor:
    """``P_N v`` for v (..., N, D) float64, row n projected with geometry row n.

    ``A v`` is read off ``v Wᵀ`` and ``Aᵀ c`` is a class-coefficient matrix times ``W``: two
    (…·N, D) × (D, C) GEMMs, no (N, K, D) tensor.
    """
    shape = v.shape
    n, k = geo.kset.shape
    flat = v.reshape(-1, n, shape[-1])  # (R, N, D)
    wv = flat @ geo.weight.T  # (R, N, C)
    y = geo.labels[None, :, None].expand(flat.shape[0], n, 1)
    kset = geo.kset.expand(flat.shape[0], n, k)
    av = wv.gather(2, y) - wv.gather(2, kset)  # (R, N, K) = A v
    c = (geo.pinv * av.unsqueeze(-2)).sum(-1)  # (R, N, K) = G⁺ A v
    coef = (
        torch.zeros_like(wv).scatter_add_(2, y, c.sum(-1, keepdim=True)).scatter_add_(2, kset, -c)
    )
    return (flat - coef @ geo.weight).reshape(shape)


def project_out_explicit(basis: Tensor, v: Tensor) -> Tensor:
    """``v − Qᵀ Q v`` for an orthonormal-row basis Q (N, K, D) and v (..., N, D)."""
    coef = (basis * v.unsqueeze(-2)).sum(-1)  # (..., N, K)
    return v - (basis * coef.unsqueeze(-1)).sum(-2)


def orthonormal_rows(a: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis (N, K, D) of the row space of ``a`` (N, K, D) float64, and its rank (N,).

    Dropped (numerically dependent) directions become zero rows. Gram + eigh, then one more
    pass on the result to restore orthonormality lost to conditioning.
    """
    basis, rank = a, None
    for _ in range(2):
        gram = basis @ basis.transpose(1, 2)
        lam, vec = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
        keep = lam > RTOL * lam[:, -1:].clamp_min(0)
        inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
        basis = (vec * inv_sqrt[:, None, :]).transpose(1, 2) @ basis
        rank = keep.sum(dim=1) if rank is None else rank
    return basis, rank


def tail_quantile_sq(delta: float, n_out: int, kind: str) -> float:
    """q² for the union bound over ``n_out`` Gaussian margins: P(any below) ≤ delta.

    ``kind="exact"``: q = Φ⁻¹(1 − δ/n_out); ``"chernoff"``: q² = 2 ln(n_out/δ) (looser).
    """
    p = delta / n_out
    if kind == "chernoff":
        return 2.0 * float(torch.log(torch.tensor(1.0 / p, dtype=torch.float64)))
    q = -float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    return q * q
