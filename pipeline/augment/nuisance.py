"""Nuisance-subspace geometry for CARROT: competitor sets, projections and noise variances.

Notation (see docs/CARROT.md): ``W`` (C, D) head weight, ``d_c = w_y − w_c``, competitor set
``Kset`` (K classes), ``A = [d_k]_{k∈Kset}`` (K, D), ``S = span(A)``, ``P_N = I − P_S``.

The geometry is computed in float64 on the weight's device and never builds a D×D matrix:
``S`` is represented by ``A`` and ``G⁺`` (the rank-thresholded pseudo-inverse of the K×K Gram
``A Aᵀ``), so ``P_S v = Aᵀ G⁺ A v``; optionally also by an orthonormal basis ``Q = Λ^-½ Vᵀ A``
of the same eigen-directions, which projects in float32 without losing accuracy to the
conditioning of ``A``. Gram entries come from the C×C class Gram of the centred weight
(centring leaves every ``d_c`` unchanged and removes the cancellation of a shared offset).

The span has rank ≤ min(K, D). When K ≥ D the K×K form is the wrong size (and K generic
differences span the whole space): the geometry is then factored in D dimensions instead, from
``AᵀA`` (D×D per row, built in row chunks): eigenvalues first (a row of rank D has no
nuisance subspace, α = 0 at once), eigenvectors only for the rank-deficient rows, ``S``
represented by its orthonormal basis alone (``pinv`` is None).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Eigenvalues of A Aᵀ below RTOL·λ_max are treated as zero (rank deficiency: duplicate or
# collinear competitors). This bounds the condition number of the kept part by RTOL^-1/2 = 1e5.
RTOL = 1e-10
# Relative uncertainty of the computed ‖P_S d‖² (eigh backward error amplified by ≤ 1/RTOL):
# nuisance variances are rounded UP by ETA·‖d‖², so α errs on the safe side.
_EPS64 = torch.finfo(torch.float64).eps
ETA_PER_COMPETITOR = 4 * _EPS64 / RTOL
# The feature-space (K ≥ D) form builds (rows, K, D) difference blocks of at most this many
# float64 elements (32 MiB) at a time.
_CHUNK_ELEMENTS = 1 << 22
# competitor_geometry's (rows, K, C) float64 blocks: at most this many elements (256 KiB) each
# (measured at N 256–768, K 10, C 200: 2^15 fastest, 2^17 1.2–1.5× slower; at K 50, C 1000 even)
_SPAN_BLOCK_ELEMENTS = 1 << 15


@dataclass(frozen=True)
class Competitors:
    """Geometry of N rows (samples, or classes in "class" mode), float64 on one device.

    Per row: ``labels`` (N,) int64 own class y; ``kset`` (N, K) int64 competitors; ``pinv``
    (N, K, K) ``G⁺`` of ``A Aᵀ``, or None when K ≥ D (then ``basis`` alone represents S);
    ``rank`` (N,) int64 numerical rank of ``A``;
    ``nuisance_var`` (N, C) ``s_c ≥ ‖P_N d_c‖²`` (rounded up; 0 where not outside);
    ``outside`` (N, C) bool, True for classes outside ``Kset ∪ {y}``.
    Shared: ``weight`` (C, D) the centred weight that defines ``A``; ``basis`` (N₀, R, D)
    orthonormal rows spanning S (zero rows for dropped directions; R = K, or the largest rank
    when K ≥ D), float32 (built with ``basis=True``) or float64 (K ≥ D without it), or None, with
    ``basis_rows`` (N,) the basis row of each row (None: row n is basis row n) — gathered
    only when projecting. ``source``: the weight exactly as given when built (detached, its
    own dtype), or None — with it, staleness and drift are read in that dtype (no float64
    centring per call).
    """

    labels: Tensor
    kset: Tensor
    pinv: Tensor | None
    rank: Tensor
    nuisance_var: Tensor
    outside: Tensor
    weight: Tensor
    basis: Tensor | None = None
    basis_rows: Tensor | None = None
    source: Tensor | None = None

    def take(self, index: Tensor) -> Competitors:
        """Rows ``index`` (B,) of this geometry (e.g. the class geometry of each sample)."""
        rows = (self.labels, self.kset, self.pinv, self.rank, self.nuisance_var, self.outside)
        basis_rows = index if self.basis_rows is None else self.basis_rows.index_select(0, index)
        return Competitors(
            *(None if t is None else t.index_select(0, index) for t in rows),
            self.weight,
            self.basis,
            basis_rows,
            self.source,
        )


def centered_weight(weight: Tensor) -> Tensor:
    """Centred, detached float64 copy of ``weight`` (C, D), or of each head's (H, C, D); margins
    and every ``d_c`` unchanged."""
    w = weight.detach().to(torch.float64)
    return w - w.mean(dim=-2, keepdim=True)


def nearest_classes(gram: Tensor, k: int) -> Tensor:
    """(C, K) int64: for each class, the K other classes with the nearest weights (Euclidean)."""
    diag = gram.diagonal()
    dist = diag[:, None] - 2 * gram + diag[None, :]  # (C, C) ‖w_i − w_j‖²
    dist.fill_diagonal_(float("inf"))
    return dist.nan_to_num(nan=float("inf")).topk(k, dim=1, largest=False).indices


def top_competitors(logits: Tensor, y: Tensor, k: int) -> Tensor:
    """(B, K) int64: the K highest logits of each row excluding its label ``y``."""
    masked = logits.detach().float().nan_to_num(nan=float("-inf"))  # a fresh tensor
    masked.scatter_(1, y[:, None], float("-inf"))
    return masked.topk(k, dim=1).indices


def competitor_geometry(
    wc: Tensor,
    gram: Tensor,
    labels: Tensor,
    kset: Tensor,
    *,
    basis: bool = False,
    offsets: Tensor | None = None,
) -> Competitors:
    """Build :class:`Competitors` for rows with labels (N,) and competitor sets (N, K).

    ``wc`` comes from :func:`centered_weight`, ``gram`` = ``wc @ wc.T`` (C, C). Cost
    O(N·K·C + N·K³), plus O(N·K²·D) with ``basis=True``; never a D×D matrix. When K ≥ D,
    :func:`_feature_space_geometry` instead (cost O(N·K·D² + N·D³), plus O(N·D²·C) for the
    rank-deficient rows only).

    Rows of several heads at once: ``offsets`` (N,) = h·C for a row of head h, ``wc`` (H·C, D)
    every head's centred weight stacked, ``gram`` (H·C, C) their Grams stacked, ``labels`` and
    ``kset`` head-local. The result's ``labels``/``kset`` then index the stacked ``wc`` (what
    :func:`project_out` reads); ``nuisance_var``/``outside`` stay head-local (N, C).
    """
    n, k = kset.shape
    c, d = gram.shape[1], wc.shape[1]
    if k >= d:
        if offsets is not None:
            raise ValueError("stacked heads need K < D (competitor_geometry per head instead)")
        return _feature_space_geometry(wc, gram, labels, kset, basis=basis)
    y = labels
    yg, kg = (y, kset) if offsets is None else (offsets + y, offsets[:, None] + kset)
    g_yc = gram.index_select(0, yg)  # (N, C)
    g_yy = g_yc.gather(1, y[:, None]).squeeze(1)  # (N,)
    g_ky = g_yc.gather(1, kset)  # (N, K)
    g_kk = gram.reshape(-1).index_select(0, (kg[:, :, None] * c + kset[:, None, :]).view(-1))
    # A Aᵀ: (N, K, K); (w_y − w_i)ᵀ(w_y − w_j) = g_yy − g_yj − g_iy + g_ij
    gram_a = g_yy[:, None, None] - g_ky[:, None, :] - g_ky[:, :, None] + g_kk.view(n, k, k)
    whiten, rank, condition = _whitening(gram_a)
    pinv = whiten @ whiten.transpose(1, 2)  # G⁺ = whiten whitenᵀ
    in_s = _in_span_sq(gram, whiten.transpose(1, 2), kg, g_ky, g_yc - g_yy[:, None])
    diag = gram.view(-1, c, c).diagonal(dim1=1, dim2=2)  # (H, C)
    diag = diag[0] if offsets is None else diag.index_select(0, offsets // c)  # (C,) or (N, C)
    diff_sq = _rounded_up_difference_sq(g_yc, diag, y, d)
    eta = ETA_PER_COMPETITOR * k
    nuisance = ((diff_sq - in_s).clamp_min(0) + eta * diff_sq).minimum(diff_sq)
    outside = outside_mask(y, kset, c)
    nuisance = torch.where(outside, nuisance, 0.0)
    q = None
    if basis:  # rows v_i/√λ_i · A of the kept eigen-directions: the very subspace of G⁺
        a = wc.index_select(0, kg.reshape(-1)).view(n, k, d)
        a = a.neg_().add_(wc.index_select(0, yg)[:, None, :])  # (N, K, D) rows d_k, in place
        q = _reorthonormalize(whiten.transpose(1, 2) @ a, condition).float()
    return Competitors(yg, kg, pinv, rank, nuisance, outside, wc, q)


def _in_span_sq(gram: Tensor, wt: Tensor, kset: Tensor, g_ky: Tensor, g_rel: Tensor) -> Tensor:
    """(N, C) ``‖P_S d_c‖²`` for every class c: ``wt`` (N, K, K) is ``whitenᵀ``, ``g_ky`` (N, K)
    the Gram entries of each competitor with y, ``g_rel`` (N, C) ``g_yc − g_yy``; ``kset``
    (N, K) indexes the rows of ``gram`` (C, C), or of stacked Grams (H·C, C).

    ``A d_c = (w_y − w_i)ᵀ(w_y − w_c) = g_ic − g_iy − (g_yc − g_yy)`` (N, K, C) is formed in
    place on the gathered rows ``g_kc``, then whitened by one batched product, in row blocks of
    at most ``_SPAN_BLOCK_ELEMENTS``: the (N, K, C) float64 blocks then stay in cache and in the
    allocator's pool (whole, they took ~2 000 fresh pages a step, 4–5 ms of page faults).
    Subtracting before the product instead of after it (a rank-1 ``baddbmm`` with an inner
    dimension of 1) took 1.56 → 1.21 ms at N 256, K 10, C 200, 0.58 → 0.25 ms at N 512, C 20."""
    n, k = kset.shape
    c = gram.shape[1]
    out = torch.empty(n, c, dtype=gram.dtype, device=gram.device)
    rows = max(1, _SPAN_BLOCK_ELEMENTS // (k * c))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        a_d = gram.index_select(0, kset[lo:hi].reshape(-1)).view(-1, k, c)  # a fresh copy
        a_d.sub_(g_ky[lo:hi, :, None]).sub_(g_rel[lo:hi, None, :])
        torch.sum(torch.bmm(wt[lo:hi], a_d).square_(), dim=1, out=out[lo:hi])
    return out


def _whitening(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``whiten`` (N, K, K) with ``whitenᵀ G whiten = I`` on the kept directions of each Gram
    G (N, K, K) float64 (``whitenᵀ A`` are orthonormal rows spanning S, ``G⁺ = whiten
    whitenᵀ``), the rank (N,), and an upper bound on λ_max/λ_min of the kept part (N,).

    Directions with eigenvalue ≤ RTOL·λ_max are dropped. Cholesky first (about 10× cheaper
    than eigh for small K): a row whose bound ``λ_min ≥ 1/‖L⁻¹‖_F²`` against ``λ_max ≤ tr G``
    proves every eigenvalue is kept gets ``whiten = L⁻ᵀ``, the same subspace; the others
    (rank-deficient, or not provably well-conditioned) go through eigh. G is symmetrized and
    its non-finite entries zeroed first.
    """
    n, k, _ = gram.shape
    gram = (0.5 * (gram + gram.transpose(1, 2))).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    chol, info = torch.linalg.cholesky_ex(gram)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device).expand(n, k, k)
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # L⁻¹
    lam_min = 1.0 / inv.square().sum(dim=(1, 2))  # ≤ λ_min (‖G⁻¹‖₂ ≤ ‖L⁻¹‖_F²)
    lam_max = gram.diagonal(dim1=1, dim2=2).sum(dim=1)  # ≥ λ_max
    proven = (info == 0) & torch.isfinite(lam_min) & (lam_min > RTOL * lam_max)
    whiten = inv.transpose(1, 2)
    rank = torch.full((n,), k, dtype=torch.int64, device=gram.device)
    condition = lam_max / lam_min
    rest = torch.nonzero(~proven).squeeze(1)  # host sync
    if rest.numel():
        lam, vec = torch.linalg.eigh(gram.index_select(0, rest))
        keep = lam > RTOL * lam[:, -1:].clamp_min(0)  # (R, K)
        inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
        whiten = whiten.index_copy(0, rest, vec * inv_sqrt[:, None, :])  # columns v_i/√λ_i
        rank = rank.index_copy(0, rest, keep.sum(dim=1))
        kept_min = torch.where(keep, lam, torch.inf).amin(dim=1)
        condition = condition.index_copy(0, rest, lam[:, -1] / kept_min)
    return whiten, rank, condition


def shared_geometry(wc: Tensor, labels: Tensor) -> Competitors:
    """:func:`competitor_geometry` when every row's Kset is all other classes (K = C − 1).

    Then ``span{w_y − w_k : k ≠ y}`` is the span of the centred weight rows whatever y is, so
    ONE orthonormal basis (1, R, D) float64 of ``wc`` (C, D) serves every row (``basis_rows``
    all 0; ``pinv`` None): one eigendecomposition instead of one per row. No class lies
    outside the Kset, so ``nuisance_var`` is 0 and ``outside`` all False.
    """
    n = labels.shape[0]
    c = wc.shape[0]
    basis, rank = centred_span_basis(wc.unsqueeze(0))
    others = torch.arange(c - 1, device=labels.device).expand(n, c - 1)
    kset = others + (others >= labels[:, None])  # (N, C − 1): every class but y
    zeros = torch.zeros(n, c, dtype=wc.dtype, device=wc.device)
    return Competitors(
        labels,
        kset,
        None,
        rank.expand(n),
        zeros,
        zeros.bool(),
        wc,
        basis,
        torch.zeros(n, dtype=torch.int64, device=labels.device),
    )


def _feature_space_geometry(
    wc: Tensor, gram: Tensor, labels: Tensor, kset: Tensor, *, basis: bool
) -> Competitors:
    """:func:`competitor_geometry` for K ≥ D, factored in D dimensions (``pinv`` is None).

    Per row ``AᵀA = Σ_k d_k d_kᵀ`` (D, D), built in chunks of rows; its eigen-directions above
    ``RTOL·λ_max`` span S. Rows of rank D (K generic differences span everything) get the
    identity basis (P_N = 0) without eigenvectors; ``‖P_S d_c‖²`` is computed only for the
    rank-deficient rows. The basis is float32 with ``basis=True``, else float64.
    """
    n, k = kset.shape
    c, d = wc.shape
    y = labels
    feature_gram = wc.new_empty(n, d, d)
    step = max(1, _CHUNK_ELEMENTS // (k * d))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        a = wc.index_select(0, y[rows]).unsqueeze(1) - wc[kset[rows]]  # (n_c, K, D)
        torch.bmm(a.transpose(1, 2), a, out=feature_gram[rows])
    q, rank = _span_of_feature_gram(feature_gram)
    diff_sq = difference_sq(gram, y, d)
    in_s = diff_sq.clone()  # rank-D rows: P_S = I
    deficient = torch.nonzero(rank < d).squeeze(1)
    step = max(1, _CHUNK_ELEMENTS // (q.shape[1] * c))
    for start in range(0, deficient.numel(), step):
        rows = deficient[start : start + step]
        u = q.index_select(0, rows)  # (n_c, R, D)
        coord = u @ wc.T  # (n_c, R, C): Q w_c
        own = coord.gather(2, y[rows][:, None, None].expand(-1, u.shape[1], 1))  # Q w_y
        in_s[rows] = (own - coord).square_().sum(dim=1)  # ‖Q d_c‖²
    eta = ETA_PER_COMPETITOR * k
    nuisance = ((diff_sq - in_s).clamp_min(0) + eta * diff_sq).minimum(diff_sq)
    outside = outside_mask(y, kset, c)
    nuisance = torch.where(outside, nuisance, 0.0)
    q = q.float() if basis else q
    return Competitors(y, kset, None, rank, nuisance, outside, wc, q)


def _span_of_feature_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal rows (N, R, D) float64 spanning the range of PSD ``gram`` (N, D, D); rank (N,).

    Eigenvalues above ``RTOL·λ_max`` count. R is the largest rank (at least 1); dropped
    directions are zero rows. Rows of full rank get the identity: eigenvectors are computed
    only for the rank-deficient rows (eigenvalues alone decide the rank of the others).
    """
    n, d, _ = gram.shape
    gram = (0.5 * (gram + gram.transpose(1, 2))).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    lam = torch.linalg.eigvalsh(gram)
    rank = (lam > RTOL * lam[:, -1:].clamp_min(0)).sum(dim=1)
    full = rank == d
    deficient = torch.nonzero(~full).squeeze(1)
    vec = keep = None
    if deficient.numel():
        lam, vec = torch.linalg.eigh(gram.index_select(0, deficient))
        keep = lam > RTOL * lam[:, -1:].clamp_min(0)
        rank = rank.index_copy(0, deficient, keep.sum(dim=1))
    width = max(1, int(rank.max()))  # host sync: the basis width is data-dependent
    basis = gram.new_zeros(n, width, d)
    if width == d:
        basis[full] = torch.eye(d, dtype=gram.dtype, device=gram.device)
    if vec is not None:  # eigenvalues ascend: the kept directions are the last columns
        rows = (vec * keep[:, None, :])[:, :, d - width :].transpose(1, 2)
        basis.index_copy_(0, deficient, rows.contiguous())
    return basis, rank


# Rows whose Gram condition number λ_max/λ_min exceeds this get a second orthonormalization
# pass: the whitened rows' orthonormality error is about eps64·λ_max/λ_min (eigh's backward
# error, amplified), below 1e-9 here, far under the float32 rounding the basis is stored in.
_REORTHO_CONDITION = 1e-9 / _EPS64


def _reorthonormalize(q: Tensor, condition: Tensor | None = None) -> Tensor:
    """One more Gram pass over nearly orthonormal rows q (N, K, D) (zero rows stay zero); with
    ``condition`` (N,) (λ_max/λ_min of the Gram they were whitened from), only for the rows
    above ``_REORTHO_CONDITION``."""
    if condition is not None:
        rows = torch.nonzero(condition > _REORTHO_CONDITION).squeeze(1)  # host sync
        if rows.numel() < q.shape[0]:
            if rows.numel():
                q.index_copy_(0, rows, _reorthonormalize(q.index_select(0, rows)))
            return q
    lam, vec = torch.linalg.eigh(q @ q.transpose(1, 2))  # eigenvalues ≈ 1 (kept) or 0 (dropped)
    inv_sqrt = torch.where(lam > 0.5, lam.clamp_min(0.5).rsqrt(), 0.0)
    return (vec * inv_sqrt[:, None, :]).transpose(1, 2) @ q


def difference_sq(gram: Tensor, labels: Tensor, dim: int) -> Tensor:
    """(N, C) float64 upper bound of ``‖w_y − w_c‖²`` from the class Gram, for labels (N,).

    Each Gram entry (a sum of ``dim`` products) is off by at most dim·eps·‖w_a‖‖w_b‖; the
    result is rounded up by 4× that, so it never underestimates.
    """
    return _rounded_up_difference_sq(gram[labels], gram.diagonal(), labels, dim)


def row_difference_sq(w: Tensor, labels: Tensor) -> Tensor:
    """(N, C) float64 upper bound of ``‖w_y − w_c‖²`` for rows w (C, D) float64, labels (N,).

    Like :func:`difference_sq` without the full class Gram: one (N, D) × (D, C) product.
    """
    rows = w.index_select(0, labels) @ w.T
    return _rounded_up_difference_sq(rows, w.square().sum(dim=1), labels, w.shape[1])


def row_difference_sq_fast(w: Tensor, labels: Tensor) -> Tensor:
    """:func:`row_difference_sq` with every product in float32 when float32 matmul is IEEE
    (else float64): about half the time. ``w`` (C, D) float32 or float64. Still an upper bound:
    rounding ``w`` to float32 (u per entry) and the float32 sums (``γ_D`` of their absolute
    terms: the squared norms and the (N, D) × (D, C) product) are added back, so the result is
    ``≥ ‖w_y − w_c‖²`` and at most about ``2·D·u·(‖w_y‖ + ‖w_c‖)²`` above it."""
    if not _ieee_fp32_matmul(w.device):
        return row_difference_sq(w.double(), labels)
    w32 = w.float()
    diag, norms, gamma = _fp32_squared_norms(w32)
    rows = (w32.index_select(0, labels) @ w32.T).double()  # (N, C), within γ·‖w_y‖‖w_c‖
    exact = diag[labels][:, None] - 2 * rows + diag[None, :]
    # errors: γ(‖w_y‖² + ‖w_c‖²) + 2γ‖w_y‖‖w_c‖ = γ(‖w_y‖ + ‖w_c‖)²; float64 sums: 4·D·eps64
    slack = (gamma + 4 * w.shape[1] * _EPS64) * (norms[labels][:, None] + norms[None, :]).square()
    return exact.clamp_min(0) + slack


def _fp32_squared_norms(w32: Tensor) -> tuple[Tensor, Tensor, float]:
    """For float32 rows w32 (C, D): their float32 squared norms as float64 (C,), each within
    ``γ·‖w_c‖²`` of exact, upper bounds ``≥ ‖w_c‖`` (C,), and γ (the float32 dot-product error
    factor for D terms, inputs rounded to float32 included)."""
    unit = torch.finfo(torch.float32).eps / 2
    gamma = gemm_error_factor(w32.shape[1], torch.float32) * (1 + unit) ** 2 + 3 * unit
    diag = w32.square().sum(dim=1).double()
    return diag, (diag * (1 + gamma)).sqrt() * (1 + _EPS64), gamma


def row_norms_up(w: Tensor, *, rounded: bool = False) -> Tensor:
    """(C,) float64 upper bounds ``≥ ‖w_c‖`` for rows w (C, D) float32 or float64: the norm's
    sum of squares is within ``γ_{D+2}`` (any summation order) and its square root within u of
    exact, the float64 scaling rounds up. ``rounded``: bound the norms of the exact rows w was
    rounded from once (e.g. a difference of two weights): ``‖exact‖ ≤ ‖w‖/(1 − u)``."""
    unit = torch.finfo(w.dtype).eps / 2
    first = (1 + 2 * unit) if rounded else 1.0
    gamma = gemm_error_factor(w.shape[1], w.dtype)  # γ_{D+2}
    up = first * (1 + gamma) * (1 + 2 * unit) * (1 + 4 * _EPS64)
    return torch.linalg.vector_norm(w, dim=1).double().mul_(up)


def _rounded_up_difference_sq(rows: Tensor, diag: Tensor, labels: Tensor, dim: int) -> Tensor:
    """``g_yy − 2 g_yc + g_cc`` from Gram rows (N, C) and the diagonal (C,), or each row's own
    diagonal (N, C) (rows of different heads), rounded up."""
    diag = diag.clamp_min(0)
    if diag.ndim == 1:
        diag = diag[None, :]
        d_yy = diag[0, labels][:, None]
    else:
        d_yy = diag.gather(1, labels[:, None])
    norms = diag.sqrt()
    exact = d_yy - 2 * rows + diag
    slack = 4 * dim * _EPS64 * (d_yy.sqrt() + norms).square()
    return exact.clamp_min(0) + slack


def outside_mask(labels: Tensor, kset: Tensor, num_classes: int) -> Tensor:
    """(N, C) bool: True for classes outside ``Kset ∪ {y}``."""
    outside = torch.ones(labels.shape[0], num_classes, dtype=torch.bool, device=labels.device)
    outside.scatter_(1, kset, False)
    return outside.scatter_(1, labels[:, None], False)


def project_out(
    geo: Competitors, v: Tensor, *, workspace: dict | None = None, use_basis: bool = False
) -> Tensor:
    """``P_N v`` for v (..., N, D), row n projected with geometry row n.

    With a ``geo.basis``, when v is float32, ``use_basis`` is set or there is no ``pinv``:
    ``v − Qᵀ Q v`` in v's dtype (``workspace``, a dict the caller keeps, holds the gathered
    basis between calls; ``use_basis`` applies to float64 v the very operator the float32
    noise uses). Otherwise float64: ``A v`` is read off ``v Wᵀ`` and ``Aᵀ G⁺ A v`` is a
    class-coefficient matrix times ``W`` — two (…·N, D) × (D, C) GEMMs, no (N, K, D) tensor.
    """
    if geo.basis is not None and (v.dtype == torch.float32 or use_basis or geo.pinv is None):
        basis = geo.basis
        if basis.shape[0] == 1:  # one basis shared by every row (`shared_geometry`)
            q = basis[0].to(v.dtype)  # (R, D)
            return v - (v @ q.T) @ q
        if geo.basis_rows is not None and v.device.type == "cpu":
            return project_out_indexed(basis.to(v.dtype), geo.basis_rows, v)
        if geo.basis_rows is not None:
            shape = (geo.basis_rows.shape[0], *basis.shape[1:])
            out = workspace_buffer(workspace, "basis", shape, basis.dtype, basis.device)
            basis = torch.index_select(basis, 0, geo.basis_rows, out=out)
        return project_out_explicit(basis.to(v.dtype), v)
    v = v.to(torch.float64)
    shape = v.shape
    n, k = geo.kset.shape
    flat = v.reshape(-1, shape[-1])  # (R·N, D)
    if flat.device.type == "cpu":
        return _project_out_sampled(geo, flat).view(shape)
    wv = (flat @ geo.weight.T).view(-1, n, geo.weight.shape[0])  # (R, N, C)
    y = geo.labels[None, :, None].expand(wv.shape[0], n, 1)
    kset = geo.kset.expand(wv.shape[0], n, k)
    av = wv.gather(2, y) - wv.gather(2, kset)  # (R, N, K) = A v
    c = (geo.pinv * av.unsqueeze(-2)).sum(-1)  # (R, N, K) = G⁺ A v
    coef = wv.zero_().scatter_add_(2, y, c.sum(-1, keepdim=True)).scatter_add_(2, kset, -c)
    return torch.addmm(flat, coef.view(-1, coef.shape[-1]), geo.weight, alpha=-1).view(shape)


def _project_out_sampled(geo: Competitors, flat: Tensor) -> Tensor:
    """The float64 coefficient form of :func:`project_out` for rows flat (R·N, D) on the CPU,
    with only the K + 1 products each row needs: ``w_c·v`` for c ∈ {y} ∪ Kset (a sampled
    product on the (R·N, C) pattern, ``torch.sparse.sampled_addmm``) instead of all C, and
    ``Aᵀ G⁺ A v = Σ c_k (w_y − w_k)`` as a weighted ``embedding_bag`` of those K + 1 rows of
    ``W`` instead of a (R·N, C) × (C, D) product: the same nonzero terms, summed in another
    order (about 2.5× faster at B 256, D 768, C 200, K 10)."""
    n, k = geo.kset.shape
    copies = flat.shape[0] // n
    classes = torch.cat([geo.labels[:, None], geo.kset], dim=1).repeat(copies, 1)  # (R·N, K+1)
    cols = classes.reshape(-1)
    wv = _sampled_dots(flat, geo.weight, cols).view(copies, n, k + 1)  # w_c·v
    av = wv[..., :1] - wv[..., 1:]  # (R, N, K) = A v
    c = (geo.pinv * av.unsqueeze(-2)).sum(-1)  # (R, N, K) = G⁺ A v
    weights = torch.cat([c.sum(-1, keepdim=True), -c], dim=-1).reshape(-1)
    return _minus_weighted_row_sums(flat, geo.weight, cols, weights, k + 1)


def _sampled_dots(v: Tensor, table: Tensor, cols: Tensor) -> Tensor:
    """(M·r,) dot products ``v_m · table[cols[m·r + j]]`` for rows v (M, D), a table (T, D) and
    r = len(cols)/M columns per row (row-major), without gathering table rows: a sampled
    product on the (M, T) pattern (``torch.sparse.sampled_addmm``)."""
    r = cols.shape[0] // v.shape[0]
    starts = torch.arange(0, cols.shape[0] + 1, r, device=v.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            starts,
            cols,
            torch.zeros(cols.shape[0], dtype=v.dtype, device=v.device),
            size=(v.shape[0], table.shape[0]),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(pattern, v, table.T).values()


def _minus_weighted_row_sums(
    v: Tensor, table: Tensor, cols: Tensor, weights: Tensor, r: int
) -> Tensor:
    """(M, D) rows ``v_m − Σ_j weights[m·r + j] · table[cols[m·r + j]]`` for v (M, D): a
    weighted ``embedding_bag`` of r table rows each (none gathered into a copy), whose fresh
    output becomes the result (no second (M, D) buffer: fresh CPU pages are costly)."""
    starts = torch.arange(0, cols.shape[0], r, device=cols.device)
    sums = F.embedding_bag(cols, table, starts, mode="sum", per_sample_weights=weights)
    return torch.sub(v, sums, out=sums)


def distinct_rows(geo: Competitors) -> tuple[Tensor, Tensor]:
    """Rows of ``geo`` that are copies of one row (e.g. a class geometry taken per sample).

    Returns ``first`` (U,) one row per distinct source and ``inverse`` (N,) the position in
    ``first`` of each row's source. Rows are distinct unless ``geo.basis_rows`` says they share
    a source row (:meth:`Competitors.take` gathers every field with the same index).
    """
    n = geo.labels.shape[0]
    rows = torch.arange(n, device=geo.labels.device)
    if geo.basis_rows is None:
        return rows, rows
    _, inverse = torch.unique(geo.basis_rows, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, device=rows.device, dtype=rows.dtype)
    return first.scatter_reduce_(0, inverse, rows, "amin"), inverse


def project_out_explicit(basis: Tensor, v: Tensor) -> Tensor:
    """``v − Qᵀ Q v`` for orthonormal rows Q (N, K, D) and v (..., N, D), in v's dtype.

    Two batched (R × D)·(D × K) products per row; no (N, K, D) temporary.
    """
    n, d = v.shape[-2:]
    rows = v.reshape(-1, n, d).transpose(0, 1)  # (N, R, D)
    coef = torch.bmm(rows, basis.transpose(1, 2))  # (N, R, K) = Q v
    return torch.baddbmm(rows, coef, basis, alpha=-1).transpose(0, 1).reshape(v.shape)


def project_out_indexed(basis: Tensor, rows: Tensor, v: Tensor) -> Tensor:
    """``v − Q_rᵀ Q_r v`` for v (..., N, D), row n projected with the orthonormal rows
    ``basis[rows[n]]`` (basis (G, K, D), rows (N,)), in v's dtype, without gathering a
    (N, K, D) copy of the basis: ``Q_r v`` is a sampled product (``torch.sparse.sampled_addmm``
    on the (N, G·K) pattern of each row's K basis rows) and ``Q_rᵀ c`` a weighted
    ``embedding_bag`` sum of those rows. On the CPU about 3× faster than the gather and two
    ``bmm`` of :func:`project_out_explicit` (B 256, D 768, K 10), the same sums in another order.
    """
    g, k, d = basis.shape
    n = rows.shape[0]
    flat = basis.reshape(g * k, d)
    vv = v.reshape(-1, d)  # (a·N, D), copies stacked copy-major
    cols = (rows[:, None] * k + torch.arange(k, device=rows.device)).view(-1)
    if vv.shape[0] > n:
        cols = cols.repeat(vv.shape[0] // n)  # (a·N·K,) basis rows of each row, in row order
    coef = _sampled_dots(vv, flat, cols)  # (a·N·K,) = Q_r v
    return _minus_weighted_row_sums(vv, flat, cols, coef, k).view(v.shape)


def workspace_buffer(
    workspace: dict | None, name: str, shape: tuple, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """The ``workspace`` tensor ``name`` of that shape, dtype and device (made on first use; fresh
    CPU pages are costly), or None without a workspace. Its contents are scratch: the next call
    overwrites them."""
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def standard_normal(
    shape: tuple,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
    workspace: dict | None = None,
) -> Tensor:
    """float32 N(0, 1) draws of ``shape`` as ``dtype`` (float32 draws cost about a fifth of
    float64 ones), into ``workspace`` buffers when given: scratch the caller must consume (e.g.
    project) before the next call. The same values with or without a workspace."""
    draw = workspace_buffer(workspace, "draw", shape, torch.float32, torch.device(device))
    out = torch.randn(shape, generator=generator, device=device, out=draw)
    if dtype == torch.float32:
        return out
    wide = workspace_buffer(workspace, "draw_wide", shape, dtype, out.device)
    return out.to(dtype) if wide is None else wide.copy_(out)


def orthonormal_rows(a: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis (N, R, D) of the row space of ``a`` (N, K, D) float64, and its rank (N,).

    Dropped (numerically dependent) directions become zero rows. K < D: R = K, Gram + eigh,
    then one more pass on the result to restore orthonormality lost to conditioning. K ≥ D:
    the D×D form ``aᵀa`` (:func:`_span_of_feature_gram`, R = the largest rank).
    """
    if a.shape[1] >= a.shape[2]:
        return _span_of_feature_gram(a.transpose(1, 2) @ a)
    basis, rank = a, None
    for _ in range(2):
        gram = basis @ basis.transpose(1, 2)
        lam, vec = torch.linalg.eigh(0.5 * (gram + gram.transpose(1, 2)))
        keep = lam > RTOL * lam[:, -1:].clamp_min(0)
        inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
        basis = (vec * inv_sqrt[:, None, :]).transpose(1, 2) @ basis
        rank = keep.sum(dim=1) if rank is None else rank
    return basis, rank


def centred_span_basis(wc: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis (N, R, D) float64 of ``span{w_y − w_k : k ≠ y}`` for centred weights
    wc (N, C, D) (:func:`centered_weight`, one set per leading index), and its rank (N,).

    That span is the row space of ``wc`` whatever y is, and centred rows sum to zero, so the
    first C − 1 rows span it: their (C − 1)² Gram is generically nonsingular and is whitened
    by Cholesky with the conditioning proof of :func:`_whitening` (eigh only for the rows it
    cannot prove), the second orthonormalization pass only where that Gram is ill-conditioned
    — where :func:`orthonormal_rows` takes two eigendecompositions of the C² Gram. Dropped
    directions are zero rows, as there.
    """
    a = wc[:, :-1]  # (N, C − 1, D)
    if a.shape[1] >= a.shape[2]:
        return orthonormal_rows(a)
    whiten, rank, condition = _whitening(a @ a.transpose(1, 2))
    return _reorthonormalize(whiten.transpose(1, 2) @ a, condition), rank


@functools.lru_cache(maxsize=256)
def tail_quantile_sq(delta: float, n_out: int, kind: str) -> float:
    """q² for the union bound over ``n_out`` Gaussian margins: P(any below) ≤ delta.

    ``kind="exact"``: q = Φ⁻¹(1 − δ/n_out); ``"chernoff"``: q² = 2 ln(n_out/δ) (looser).
    """
    p = delta / n_out
    if kind == "chernoff":
        return 2.0 * float(torch.log(torch.tensor(1.0 / p, dtype=torch.float64)))
    q = -float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    return q * q


def margin_slack(
    z: Tensor,
    y: Tensor,
    weight: Tensor,
    gamma: float,
    out_dtype: torch.dtype,
    bias: Tensor | None = None,
    *,
    logits: Tensor | None = None,
    logits_error: Tensor | None = None,
    row_heads: Tensor | None = None,
    z_norm: Tensor | None = None,
) -> Tensor:
    """(B, C) float64 ``m_c − γ`` of features z (B, D), minus a rounding allowance; +inf at y.

    With the head's ``bias`` (C,), margins are ``(w_y − w_c)ᵀz + b_y − b_c``: the noise moves only
    the first term, so the bias shifts every margin by a constant the chance bound starts from.

    Margins come from the centred weight in a float32 GEMM when that GEMM is IEEE (no TF32/bf16
    modes) and z is not float64, else in float64. The allowance bounds the GEMM's error
    (D·u per product, whatever the summation order; +2u for centring in float32) and rounding
    the augmented row to ``out_dtype`` (2·u): ``(gemm + 2·u_out)·‖z‖·(‖w_y‖ + ‖w_c‖)``. So a
    margin equal to γ in exact arithmetic (e.g. against a duplicate class) never counts.

    Given ``logits`` (B, C) ``≈ W z + b`` (float32 or float64) with ``logits_error`` (broadcastable
    to (B, C)), a bound on ``|logits − (W z + b)|`` per entry (e.g. :func:`linear_logits_error`),
    the margins are read off them: no GEMM; the allowance is ``err_y + err_c`` plus the rounding
    term. Rows of several heads (logits given): ``weight`` (H, C, D) and ``row_heads`` (B,) the
    head of each row. ``z_norm`` (B,): z's float32 row norms (``vector_norm``), if the caller
    has them already.
    """
    d = z.shape[1]
    u_out = 0.0 if out_dtype == torch.float64 else torch.finfo(out_dtype).eps / 2
    if logits is not None and logits_error is not None:
        if logits.shape != (z.shape[0], weight.shape[-2]):
            raise ValueError(f"logits {tuple(logits.shape)} do not match z and weight")
        if logits.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"logits with logits_error must be float32/64, not {logits.dtype}")
        values = logits.detach().to(torch.float64, copy=True)  # ours: worked on in place
        err = torch.broadcast_to(logits_error.detach().double(), values.shape)
        if u_out:  # rounding z̃: ‖w_y − w_c‖ ≤ ‖w_y‖ + ‖w_c‖, norms in float32 rounded up
            up = 1 + gemm_error_factor(d, torch.float32)
            norms = weight.detach().float().norm(dim=-1).double()  # (C,) or (H, C)
            norms = norms[None, :] if row_heads is None else norms.index_select(0, row_heads)
            if z_norm is None:
                z_norm = torch.linalg.vector_norm(z.detach().float(), dim=1)
            rows = z_norm.double()[:, None]
            err = torch.addcmul(err, rows, norms, value=2 * u_out * up * up)
        # margin − allowance = (l_y − e_y) − γ − (l_c + e_c): exact float32 values in float64
        own = y[:, None]
        low = values.gather(1, own).sub_(err.gather(1, own)).sub_(gamma)  # (B, 1)
        high = values.add_(err)  # (B, C) l_c + e_c, in place
        return torch.sub(low, high, out=high).scatter_(1, own, float("inf"))
    if row_heads is not None:
        raise ValueError("margins of several heads are read off their logits: pass logits_error")
    if z.dtype != torch.float64 and _ieee_fp32_matmul(z.device):
        unit = torch.finfo(torch.float32).eps / 2
        zz, w = z.detach().float(), weight.detach().float()
        gemm = (d + 2) * unit / (1 - (d + 2) * unit)
    else:
        zz, w = z.detach().double(), weight.detach().double()
        gemm = 4 * d * _EPS64
    w = w - w.mean(dim=0, keepdim=True)
    logits = (zz @ w.T).double()
    margin = logits.gather(1, y[:, None]) - logits  # exact: float32 differences in float64
    norms = w.norm(dim=1).double() * (1 + 1e-5)
    z_norm = zz.norm(dim=1, keepdim=True).double() * (1 + 1e-5)
    allowance = (gemm + 2 * u_out) * z_norm * (norms[y][:, None] + norms[None, :])
    if bias is not None:  # exact float64 differences of the bias; the head adds it in float32
        bb = bias.detach().double()
        margin = margin + (bb[y][:, None] - bb[None, :])
        unit32 = torch.finfo(torch.float32).eps / 2
        allowance = allowance + 4 * unit32 * (
            bb.abs()[y][:, None] + bb.abs()[None, :] + margin.abs()
        )
    return (margin - gamma - allowance).scatter(1, y[:, None], float("inf"))


def gemm_error_factor(terms: int, dtype: torch.dtype) -> float:
    """``γ_n = n·u / (1 − n·u)``: |fl(Σ) − Σ| ≤ γ_n·Σ|products| for a sum of ``terms`` products
    (any summation order, products rounded too) in ``dtype`` (float32 or float64)."""
    unit = torch.finfo(dtype).eps / 2
    n = terms + 2
    return n * unit / (1 - n * unit)


def linear_logits_error(
    z: Tensor, weight: Tensor, bias: Tensor | None = None, *, extra_terms: int = 4
) -> Tensor | None:
    """(B, C) float64 bound on ``|fl(W z + b) − (W z + b)|`` for logits from ONE IEEE float32
    (or float64) GEMM plus the bias (``F.linear``): ``γ_{D+m}·(‖z‖‖w_c‖ + |b_c|)``; None when the
    matmul is not plain IEEE (TF32, bf16 passes, autocast) — then margins must be recomputed."""
    dt = torch.promote_types(z.dtype, weight.dtype)
    if dt not in (torch.float32, torch.float64) or torch.is_autocast_enabled(z.device.type):
        return None
    if dt == torch.float32 and not _ieee_fp32_matmul(z.device):
        return None
    d = z.shape[1]
    gamma = gemm_error_factor(d + extra_terms, dt)
    up = 1 + gemm_error_factor(d, dt)  # the norms' own rounding, up
    z_norm = z.detach().to(dt).norm(dim=1, keepdim=True).double()
    scale = z_norm * weight.detach().to(dt).norm(dim=1).double()
    if bias is not None:
        scale = scale + bias.detach().double().abs()
    return (gamma * up * up) * scale


def ieee_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` matmul on ``device`` is plain IEEE (float64 always; float32 unless
    TF32 or bf16 passes are on; lower precisions never)."""
    if dtype == torch.float64:
        return True
    return dtype == torch.float32 and _ieee_fp32_matmul(device)


def _ieee_fp32_matmul(device: torch.device) -> bool:
    """Whether float32 matmul on ``device`` is plain IEEE float32 (not TF32 or bf16 passes)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    if device.type == "cuda":
        backend = torch.backends.cuda.matmul
        return not backend.allow_tf32 and getattr(backend, "fp32_precision", "none") in (
            "none",
            "ieee",
        )
    if device.type == "cpu":
        backend = getattr(torch.backends.mkldnn, "matmul", None)
        return getattr(backend, "fp32_precision", "none") in ("none", "ieee")
    return False


def chance_alpha(
    slack: Tensor,
    var_bound: Tensor,
    outside: Tensor,
    *,
    n_out: int,
    q2: float,
    refine: int = 0,
    exact_var: Callable[[Tensor], Tensor] | None = None,
    eta: float = 0.0,
) -> Tensor:
    """(B,) float64 α = min over the ``n_out`` outside classes of slack²/(s·q²); +inf if none.

    ``var_bound`` (B, C) must never underestimate the variance of an outside margin per unit
    α. With ``exact_var`` (class indices (B, r) → variances (B, r)), the ``refine`` classes with
    the smallest bounded ratio are recomputed exactly (rounded up by ``eta``·bound); the others
    keep their bound, which only makes α smaller.
    """
    if n_out == 0:
        return torch.full_like(slack[:, 0], float("inf"))
    ratio = torch.where(outside, slack.clamp_min(0).square() / var_bound, float("inf"))
    if exact_var is None or refine == 0:
        return ratio.min(dim=1).values / q2
    r = min(refine, n_out)
    smallest, idx = ratio.topk(min(r + 1, n_out), dim=1, largest=False)
    idx = idx[:, :r]
    bound = var_bound.gather(1, idx)
    exact = (exact_var(idx) + eta * bound).minimum(bound)
    best = (slack.gather(1, idx).clamp_min(0).square() / exact).min(dim=1).values
    if n_out > r:  # the classes not refined keep their (smaller, safe) bounded ratio
        best = best.minimum(smallest[:, r])
    return best / q2


def cap_alpha(
    alpha: Tensor, eligible: Tensor, noise: Tensor, norm: Tensor, cap: float | None
) -> Tensor:
    """Cap ``√α·‖noise_j‖ ≤ cap·norm`` for every copy j, zero ineligible rows: finite, >= 0.

    ``noise`` (a, B, D) unit-scale P_N ε; shrinking α for a draw only lowers every violation
    probability, so the cap keeps the chance constraint.
    """
    if cap is not None:
        worst = noise.square().sum(-1).amax(dim=0).to(torch.float64)  # (B,)
        alpha = alpha.minimum((cap * norm).square() / worst)
    ok = eligible & torch.isfinite(alpha) & (alpha > 0)
    return torch.where(ok, alpha, 0.0)


@dataclass(frozen=True)
class LayerNormJacobian:
    """A LayerNorm ``z = g ⊙ (x − μ)/σ + b`` linearized at rows x (B, D), float64.

    ``J = diag(g) (I − 11ᵀ/D − x̂x̂ᵀ/D) / σ`` (σ includes the LayerNorm's eps); for pre-LN
    injection the constraint directions are ``Jᵀ d_k``.
    """

    xhat: Tensor  # (B, D) (x − μ)/σ
    sigma: Tensor  # (B, 1)
    gain: Tensor  # (D,)
    bias: Tensor  # (D,)

    @classmethod
    def at(cls, x: Tensor, ln: torch.nn.LayerNorm) -> LayerNormJacobian:
        x64 = x.detach().to(torch.float64)
        centred = x64 - x64.mean(dim=1, keepdim=True)
        sigma = (centred.square().mean(dim=1, keepdim=True) + ln.eps).sqrt()
        d = x.shape[1]
        ones = torch.ones(d, dtype=torch.float64, device=x.device)
        gain = ones if ln.weight is None else ln.weight.detach().to(ones)
        bias = ones * 0 if ln.bias is None else ln.bias.detach().to(ones)
        return cls(centred / sigma, sigma, gain, bias)

    def output(self) -> Tensor:
        """(B, D) the LayerNorm's output."""
        return self.gain * self.xhat + self.bias

    def pull_back(self, v: Tensor) -> Tensor:
        """``Jᵀ v`` for v (B, r, D) → (B, r, D)."""
        v = self.gain * v
        v = v - v.mean(dim=-1, keepdim=True)
        xhat = self.xhat[:, None, :]
        v = v - (v * xhat).sum(-1, keepdim=True) / v.shape[-1] * xhat
        return v / self.sigma[:, :, None]

    def gain_sq_bound(self) -> Tensor:
        """(B, 1): ``‖Jᵀ v‖² ≤ bound·‖v‖²`` (the projector has norm ≤ 1)."""
        return self.gain.square().max() / self.sigma.square()

    def centred_norm(self) -> Tensor:
        """(B,) ``‖x − μ‖``, the scale of the pre-LN noise cap."""
        return (self.xhat * self.sigma).norm(dim=1)


def class_factor_from_features(
    features: Tensor, labels: Tensor, *, num_classes: int, rank: int
) -> Tensor:
    """(C, D, rank) float32 low-rank factor L_c of each class covariance (L_c L_cᵀ ≈ Σ_c).

    Columns are the top principal directions of the class's features scaled by their standard
    deviation; classes with fewer than 2 samples get a zero factor (their rows are not augmented
    under ``noise="class_cov"``). A one-off computation, e.g. over the cached store.
    """
    d = features.shape[1]
    factor = torch.zeros(num_classes, d, rank, device=features.device)
    for c in range(num_classes):
        rows = features[labels == c].to(torch.float64)
        if rows.shape[0] < 2:
            continue
        centred = (rows - rows.mean(dim=0)) / math.sqrt(rows.shape[0] - 1)
        _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
        r = min(rank, sv.shape[0])
        factor[c, :, :r] = (vh[:r].T * sv[:r]).float()
    return factor


def factor_spectrum(class_factor: Tensor | None, weight: Tensor) -> tuple[Tensor, Tensor]:
    """float64 class factor (C, D, r) on the weight's device and σ_max(L_c)² per class (C,)."""
    c, d = weight.shape
    if class_factor is None or class_factor.ndim != 3 or tuple(class_factor.shape[:2]) != (c, d):
        got = None if class_factor is None else tuple(class_factor.shape)
        raise ValueError(f'noise="class_cov" needs class_factor of shape ({c}, {d}, r); got {got}')
    factor = class_factor.detach().to(device=weight.device, dtype=torch.float64)
    small = factor.transpose(1, 2) @ factor  # (C, r, r)
    return factor, torch.linalg.eigvalsh(small)[:, -1].clamp_min(0)
