"""CARROT: label-safe feature augmentation in the nuisance subspace of a linear head.

For a sample ``(z, y)`` classified with margin, the noise ``√α · P_N ε`` is orthogonal to every
competitor difference ``d_k = w_y − w_k`` (k ∈ Kset), so those margins do not move; ``α`` is the
largest variance for which the union bound over the other classes keeps
``P(any margin < γ) ≤ δ``. See docs/CARROT.md for the math; pipeline/augment/nuisance.py for the
geometry. Shapes: B rows, D features, C classes, K = min(topk, C − 1) competitors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.augment.nuisance import (
    ETA_PER_COMPETITOR,
    Competitors,
    LayerNormJacobian,
    cap_alpha,
    centered_weight,
    chance_alpha,
    class_factor_from_features,
    competitor_geometry,
    difference_sq,
    distinct_rows,
    factor_spectrum,
    margin_slack,
    nearest_classes,
    orthonormal_rows,
    outside_mask,
    project_out,
    project_out_explicit,
    row_difference_sq,
    row_difference_sq_fast,
    row_norms_up,
    shared_geometry,
    standard_normal,
    tail_quantile_sq,
    top_competitors,
)

__all__ = [
    "DEFAULT_RELATIVE_CAP",
    "CarrotAugment",
    "CarrotConfig",
    "CarrotOutput",
    "carrot_augment",
    "carrot_augment_pre_ln",
    "carrot_loss",
    "class_factor_from_features",
]

log = logging.getLogger(__name__)

# When no class lies outside Kset (e.g. C = 2 or K = C − 1) the chance constraint is empty and
# every Kset margin is exact, so only a norm cap bounds the noise: without ``alpha_max`` the
# noise norm is capped at this multiple of ‖z‖.
DEFAULT_RELATIVE_CAP = 1.0
# Pre-LN injection is only first-order safe, so it is always capped (relative to ‖x − mean(x)‖);
# this is the cap used when ``alpha_max`` is None.
PRE_LN_DEFAULT_CAP = 0.1
_EPS64 = torch.finfo(torch.float64).eps


_CHOICES = {
    "mode": ("sample", "class"),
    "noise": ("isotropic", "class_cov"),
    "quantile": ("exact", "chernoff"),
    "injection": ("post_ln", "pre_ln"),
}


@dataclass(frozen=True)
class CarrotConfig:
    """Settings of the CARROT augmentation (validated on construction). A warm-up without
    augmentation is the trainer's (`TrainConfig.aug_warmup_epochs`, one setting for every
    augmentation); heads start from their plain optimum anyway (`pipeline.heads.train`)."""

    topk: int = 10  # competitors per sample/class whose margins stay exact (K = min(topk, C−1))
    delta: float = 0.05  # allowed P(any other margin falls below gamma), in (0, 0.5)
    gamma: float = 0.0  # margin floor; rows with any margin <= gamma are not augmented
    mode: Literal["sample", "class"] = "sample"  # Kset: top-K logits, or K nearest class weights
    aug_per_sample: int = 1  # augmented copies per eligible row
    aug_weight: float = 1.0  # weight of the augmented cross-entropy term in the loss
    refresh: int = 50  # "class" mode in CarrotAugment: recompute class geometry every N calls
    # (in between, the stale geometry keeps the guarantee for the current weight, at some α)
    alpha_max: float | None = None  # cap on √α·‖P_N ε‖/‖z‖ per row (None: no cap)
    noise: Literal["isotropic", "class_cov"] = "isotropic"  # class_cov needs `class_factor`
    quantile: Literal["exact", "chernoff"] = "exact"  # Φ⁻¹(1−δ/n_out), or q² = 2 ln(n_out/δ)
    injection: Literal["post_ln", "pre_ln"] = "post_ln"  # pre_ln: carrot_augment_pre_ln
    refine: int = 4  # classes per row whose noise variance is computed exactly when only bounded

    def __post_init__(self) -> None:
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"CarrotConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name, low in (
            ("topk", 1),
            ("aug_per_sample", 1),
            ("refresh", 1),
            ("refine", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"an integer >= {low}")
        if not 0.0 < float(self.delta) < 0.5:
            fail("delta", "in (0, 0.5)")
        for name in ("gamma", "aug_weight"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "finite and >= 0")
        if self.alpha_max is not None and not (
            math.isfinite(self.alpha_max) and self.alpha_max > 0
        ):
            fail("alpha_max", "None or a finite number > 0")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}")


@dataclass
class CarrotOutput:
    """Augmented rows. M = (rows augmented) × aug_per_sample, copies stacked copy-major.

    ``z`` (M, D) in the input dtype, differentiable w.r.t. the input; ``y`` (M,) int64 labels;
    ``source`` (M,) int64 row of the input each came from; ``alpha`` (B,) float32 noise variance
    per input row (0 = not augmented, never requires grad). ``diagnostics`` holds 0-dim float32
    tensors (no host sync; call ``float()`` to log): ``frac_augmented``, ``median_alpha``,
    ``median_noise_ratio`` (‖z̃ − z‖/‖z‖), ``violation_rate`` (augmented rows whose margin
    against any class fell below gamma, measured with the weight given; with ``measure=False``
    it is left to whoever computes the augmented logits: :meth:`record_violations`).
    ``delta`` (M, D): the noise ``z̃ − z[source]``, detached (post-LN injection; None pre-LN), so
    the augmented logits are ``logits[source] + W·delta`` (:func:`carrot_loss`); ``gamma`` the
    margin floor the violations are counted against; ``every_row``: ``source`` is 0, 1, …, B − 1.
    Post-LN, ``z`` is built on first access from ``rows`` (the augmented input rows,
    (M / aug_per_sample, D)) and ``delta``: a caller that uses ``delta`` (the bank,
    :func:`carrot_loss`) never pays for it.
    """

    y: Tensor
    source: Tensor
    alpha: Tensor
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    delta: Tensor | None = None
    gamma: float = 0.0
    rows: Tensor | None = None
    _z: Tensor | None = field(default=None, repr=False)
    every_row: bool = False  # source is 0, 1, …, B − 1: every row augmented once

    @property
    def z(self) -> Tensor:
        """(M, D) augmented rows ``z[source] + delta``, differentiable w.r.t. the input."""
        if self._z is None:
            rows, delta = self.rows, self.delta
            if rows.shape[0] == 0:  # nothing augmented
                self._z = rows
            else:
                self._z = (rows.unsqueeze(0) + delta.view(-1, *rows.shape)).view(delta.shape)
        return self._z

    def record_violations(self, aug_logits: Tensor) -> None:
        """Set ``diagnostics["violation_rate"]`` from the augmented rows' logits (M, C)."""
        self.diagnostics["violation_rate"] = violation_rate(aug_logits, self.y, self.gamma)


def violation_rate(
    aug_logits: Tensor, y: Tensor, gamma: float, mask: Tensor | None = None
) -> Tensor:
    """Float32 fraction of the rows of ``aug_logits`` (..., M, C), labels ``y`` (..., M), whose
    margin against some class fell below ``gamma``: 0-dim, or one rate per leading index (e.g.
    per head). Rows where ``mask`` (..., M) is False do not count; no rows → 0."""
    with torch.no_grad():
        la = aug_logits.detach().float()
        margin = la.gather(-1, y[..., None]) - la
        margin.scatter_(-1, y[..., None], float("inf"))
        bad = (margin < gamma).any(dim=-1).float()
        if mask is not None:
            bad = bad * mask
        count = bad.shape[-1] if mask is None else mask.sum(-1)
        return bad.sum(-1) / torch.as_tensor(count, device=la.device).clamp_min(1)


def carrot_augment(
    z: Tensor,
    y: Tensor,
    logits: Tensor,
    weight: Tensor,
    cfg: CarrotConfig,
    *,
    generator: torch.Generator | None = None,
    class_factor: Tensor | None = None,
    bias: Tensor | None = None,
    logits_error: Tensor | None = None,
    measure: bool = True,
    workspace: dict | None = None,
) -> CarrotOutput:
    """Augment post-LN features ``z`` (B, D) with labels ``y`` (B,) for a head ``weight`` (C, D)
    and optional ``bias`` (C,) (logits ``W z + b``: the bias shifts the margins, the noise does
    not move it).

    ``logits`` (B, C) select the "sample"-mode competitors (any dtype; only their order is used).
    With ``logits_error`` (a bound on ``|logits − (W z + b)|``, broadcastable to (B, C): see
    :func:`~pipeline.augment.nuisance.linear_logits_error`) the margins are read off ``logits``
    too, saving a (B, D) × (D, C) product. ``measure=False`` leaves ``violation_rate`` to the
    caller that computes the augmented logits (:meth:`CarrotOutput.record_violations`; done by
    :func:`carrot_loss`), saving another.
    Everything but ``out.z`` is computed without gradient and never below float32 (bf16/fp16
    inputs included): the geometry in float64, margins in IEEE float32 with a rigorous
    rounding allowance (float64 if TF32/bf16 matmul modes are on), the noise in float64
    ("sample") or float32 against a float64-built orthonormal basis ("class"). ``out.z``
    carries gradient to ``z`` (d z̃ / d z = I). ``class_factor`` (C, D, r): low-rank factor
    ``L_y`` of each class covariance, required for ``cfg.noise == "class_cov"`` (noise
    ``P_N L_y ξ``, ξ ~ N(0, I_r); see :func:`class_factor_from_features`).
    Deterministic given ``generator`` (on ``weight``'s device); ``workspace`` (a dict the
    caller keeps, as :class:`CarrotAugment` does) reuses scratch buffers. Per call: O(C²·D) for the
    class Gram plus O(B·C·D); never a D×D matrix, no per-sample Python loop.
    """
    if cfg.injection != "post_ln":
        raise ValueError('cfg.injection is "pre_ln": call carrot_augment_pre_ln(x, ..., ln, cfg)')
    _check_inputs(z, y, weight)
    with torch.no_grad():
        wc = centered_weight(weight)
        k = min(cfg.topk, weight.shape[0] - 1)
        if cfg.mode == "sample" and k == weight.shape[0] - 1:  # every other class competes
            geo = shared_geometry(wc, y)  # needs no class Gram
        elif cfg.mode == "sample":
            geo = competitor_geometry(wc, wc @ wc.T, y, top_competitors(logits, y, k))
        else:
            gram = wc @ wc.T
            classes, inverse = torch.unique(y, return_inverse=True)
            kset = nearest_classes(gram, k).index_select(0, classes)
            geo = competitor_geometry(wc, gram, classes, kset, basis=True).take(inverse)
        geo = dataclasses.replace(geo, source=weight.detach())
    return augment_with_geometry(
        z,
        y,
        weight,
        cfg,
        geo,
        generator=generator,
        class_factor=class_factor,
        bias=bias,
        logits=logits if logits_error is not None else None,
        logits_error=logits_error,
        measure=measure,
        workspace=workspace,
    )


def augment_with_geometry(
    z: Tensor,
    y: Tensor,
    weight: Tensor,
    cfg: CarrotConfig,
    geo: Competitors,
    *,
    generator: torch.Generator | None = None,
    class_factor: Tensor | None = None,
    workspace: dict | None = None,
    bias: Tensor | None = None,
    logits: Tensor | None = None,
    logits_error: Tensor | None = None,
    measure: bool = True,
    rows: Tensor | None = None,
) -> CarrotOutput:
    """Core of :func:`carrot_augment` given per-row geometry ``geo`` (B rows, any Kset), or a
    geometry of N rows and ``rows`` (B,), the geometry row of each input row (e.g. the class
    geometry and the labels: per-row fields are then gathered only where needed).

    Margins use the current ``weight``; the noise is projected with ``geo``, which may be a
    cached class geometry built from an earlier weight (see :class:`CarrotAugment`). Such a
    *stale* geometry (``geo.weight`` is not the centred current weight) keeps the guarantee for
    the current weight: every class but y enters the union bound (see :func:`_stale_alpha`).
    ``workspace``: a dict kept by the caller to reuse scratch buffers between calls.
    """
    _check_inputs(z, y, weight)
    b, d = z.shape
    source_geo = geo
    if rows is not None:
        geo = _RowView(geo, rows)  # type: ignore[assignment]
    k = geo.kset.shape[1]
    n_out = weight.shape[0] - 1 - k
    # float32 noise when a float32 orthonormal basis is available (accurate whatever the
    # conditioning), else float64 (the coefficient form, or a float64 basis when K ≥ D)
    float32_basis = geo.basis is not None and geo.basis.dtype == torch.float32
    work = torch.float32 if float32_basis and z.dtype != torch.float64 else torch.float64
    q2 = tail_quantile_sq(cfg.delta, n_out, cfg.quantile) if n_out else math.inf
    with torch.no_grad():
        if geo.weight.shape != weight.shape:
            raise ValueError(
                f"geometry built for a weight of shape {tuple(geo.weight.shape)}, "
                f"weight has {tuple(weight.shape)}: rebuild it (competitor_geometry)"
            )
        if _has_source(geo, weight):  # staleness and drift in the weight's own dtype
            wc, stale = None, not _same_values(geo.source, weight.detach())
        else:
            wc = centered_weight(weight)
            stale = not torch.equal(wc, geo.weight)  # host sync
        z_norm = torch.linalg.vector_norm(z.detach().float(), dim=1)  # (B,) float32
        slack = margin_slack(  # (B, C), +inf at y
            z,
            y,
            weight,
            cfg.gamma,
            z.dtype,
            bias,
            logits=logits,
            logits_error=logits_error,
            z_norm=z_norm,
        )
        eligible = (slack > 0).all(dim=1) & (geo.rank < d)
        shape = (cfg.aug_per_sample, b, d)
        factor_y = scale = None
        if cfg.noise == "class_cov":
            factor, spectral_sq = factor_spectrum(class_factor, weight)
            factor_y = factor.index_select(0, y)  # (B, D, r)
            scale = spectral_sq[y][:, None]  # ‖L_yᵀu‖² ≤ σ_max(L_y)²‖u‖²
        if stale and factor_y is None:
            frame = _drift_frame(weight, geo, wc)
            alpha = _stale_alpha_isotropic(slack, eligible, source_geo, frame, cfg, rows, workspace)
        elif stale:
            wc = centered_weight(weight) if wc is None else wc
            alpha = _stale_alpha(slack, eligible, geo, wc, cfg, factor_y, scale, work)
        elif cfg.noise == "isotropic":  # geo.nuisance_var is the exact variance: no refining
            alpha = chance_alpha(slack, geo.nuisance_var, geo.outside, n_out=n_out, q2=q2)
        else:
            wc = centered_weight(weight) if wc is None else wc

            def exact_var(idx: Tensor) -> Tensor:  # (B, r) classes → (B, r) ‖L_yᵀ P_N d_c‖²
                dirs = (wc[y][:, None, :] - wc[idx]).transpose(0, 1)  # (r, B, D)
                proj = project_out(geo, dirs).to(torch.float64)
                return torch.einsum("bdq,rbd->rbq", factor_y, proj).square().sum(-1).T

            alpha = chance_alpha(
                slack,
                geo.nuisance_var * scale,
                geo.outside,
                n_out=n_out,
                q2=q2,
                refine=cfg.refine,
                exact_var=exact_var,
                eta=ETA_PER_COMPETITOR * k,
            )
        if factor_y is None:  # scratch buffers: projected (a fresh tensor) right below
            base = standard_normal(shape, generator, z.device, work, workspace)
        else:
            xi = torch.randn((*shape[:2], factor_y.shape[2]), generator=generator, device=z.device)
            base = torch.einsum("bdq,abq->abd", factor_y.to(work), xi.to(work))
        noise = project_out(geo, base, workspace=workspace)  # (a, B, D) unit-scale P_N ε
        # float64 projection of float32 rows: rounding it once more moves a Kset margin by
        # ≤ u·‖d_k‖‖noise‖, the same as storing z̃ does anyway
        noise = noise.to(torch.promote_types(z.dtype, torch.float32))
        default = DEFAULT_RELATIVE_CAP if n_out == 0 else None
        cap = cfg.alpha_max if cfg.alpha_max is not None else default
        alpha = cap_alpha(alpha, eligible, noise, z_norm.double(), cap)
    return _assemble(
        z, y, weight, cfg, alpha, noise, features=None, bias=bias, measure=measure, norms=z_norm
    )


class _RowView:
    """Geometry ``geo`` seen row by row through ``rows`` (B,): each field is gathered on first
    use; the basis is never gathered (``basis_rows`` composes the index), so projecting costs
    one gather of the basis rows in use."""

    _PER_ROW = ("labels", "kset", "pinv", "rank", "nuisance_var", "outside")

    def __init__(self, geo: Competitors, rows: Tensor) -> None:
        self._geo, self._rows, self._cache = geo, rows, {}
        self.weight, self.basis, self.source = geo.weight, geo.basis, geo.source
        base = geo.basis_rows
        self.basis_rows = rows if base is None else base.index_select(0, rows)

    def __getattr__(self, name: str):
        if name not in _RowView._PER_ROW:
            raise AttributeError(name)
        cache = self.__dict__["_cache"]
        if name not in cache:
            value = getattr(self._geo, name)
            cache[name] = None if value is None else value.index_select(0, self._rows)
        return cache[name]

    def take(self, index: Tensor) -> Competitors:
        return self._geo.take(self._rows.index_select(0, index))


def _has_source(geo: Competitors, weight: Tensor) -> bool:
    """Whether ``geo.source`` (the weight it was built from) is comparable with ``weight``."""
    src = geo.source
    return src is not None and src.dtype == weight.dtype and src.device == weight.device


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal(a, b)``, at once when ``b`` views the very memory of ``a`` (a geometry built
    from this weight in this call); else a host sync."""
    alias = (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )
    return alias or torch.equal(a, b)


def _drift_frame(weight: Tensor, geo: Competitors, wc: Tensor | None) -> tuple[Tensor, Tensor]:
    """(position, origin), both (C, D): the drift is ``Δ = position − origin`` up to a shared
    offset (which cancels in every ``Δ_y − Δ_c``). The current weight and ``geo.source`` (at
    least float32), else the float64 centred weight and ``geo.weight``."""
    if _has_source(geo, weight):
        dt = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16: difference in fp32
        return weight.detach().to(dt), geo.source.to(dt)
    return (centered_weight(weight) if wc is None else wc), geo.weight


def _stale_alpha_isotropic(
    slack: Tensor,
    eligible: Tensor,
    geo: Competitors,
    frame: tuple[Tensor, Tensor],
    cfg: CarrotConfig,
    rows: Tensor | None = None,
    workspace: dict | None = None,
) -> Tensor:
    """(B,) float64 α of :func:`_stale_alpha` for isotropic noise; ``frame`` (position, origin)
    gives the drift ``Δ = position − origin`` (:func:`_drift_frame`).

    For every class c ≠ y the margin moves by ``√α·d_cᵀ P_N ε`` (OLD projector, CURRENT
    ``d_c = d_c⁰ + (Δ_y − Δ_c)``): its standard deviation per unit √α is
    ``≤ √s_c⁰ + ‖Δ_y − Δ_c‖`` (:func:`_stale_spread`), which for a Kset class (``s_k⁰ = 0``) is
    ``‖Δ_y − Δ_k‖`` (≥ ``‖P_N (Δ_y − Δ_k)‖``). The union bound runs over all C − 1 classes:
    ``α = min_c (slack_c / spread_c)² / q²``, shrunk by 16 float64 units for the roundings of
    the spread and of the quotient. Rows not ``eligible`` get 0. ``rows``: as in
    :func:`augment_with_geometry`; ``workspace`` keeps the anchor of :func:`_stale_spread`.
    """
    spread = _stale_spread(*frame, geo, rows, workspace)
    q2 = tail_quantile_sq(cfg.delta, frame[0].shape[0] - 1, cfg.quantile)
    ratio = torch.div(slack, spread, out=spread)  # +inf at y; the rows it matters for: > 0
    alpha = ratio.amin(dim=1).square_().mul_((1 - 16 * _EPS64) / q2)
    return torch.where(eligible & ~alpha.isnan(), alpha, 0.0)


# A stale class geometry's drift bound is recomputed exactly (one C × D × C product) every this
# many calls; in between it grows by the triangle inequality from that anchor.
DRIFT_ANCHOR_CALLS = 5


def _stale_spread(
    position: Tensor,
    origin: Tensor,
    geo: Competitors,
    rows: Tensor | None,
    workspace: dict | None,
) -> Tensor:
    """(B, C) float64 upper bounds of ``√s_c⁰ + ‖Δ_y − Δ_c‖`` (a fresh tensor) for the drift
    ``Δ = position − origin`` (rows (C, D), rounded once), a geometry ``geo`` of N rows (its
    ``labels``, ``nuisance_var`` s⁰ and ``source``), and ``rows`` (B,) the geometry row of each
    batch row (None: N = B, row b is row b).

    Without a ``workspace``: one float32 (U, D) × (D, C) product for the U distinct geometry
    rows, rounded up (:func:`row_difference_sq_fast`). With one (a dict kept between calls, as
    :class:`CarrotAugment` does): the exact spread of all N rows at an *anchor* position ``p^a``,
    taken every :data:`DRIFT_ANCHOR_CALLS` calls, and in between
    ``‖Δ_y − Δ_c‖ ≤ ‖Δ^a_y − Δ^a_c‖ + ‖e_y‖ + ‖e_c‖`` with ``e = position − p^a`` (norms rounded
    up, the float rounding of ``e`` included) — one (C, D) difference, a gather and two broadcast
    sums a call instead of a product. The anchor belongs to the geometry's ``source`` weight and
    is retaken when that changes.
    """
    labels, nuisance_var, source = geo.labels, geo.nuisance_var, geo.source
    if workspace is None or source is None:
        if rows is None:
            first, inverse = distinct_rows(geo)
        else:
            first, inverse = torch.unique(rows, return_inverse=True)
        drift = position - origin
        moved = row_difference_sq_fast(drift, labels.index_select(0, first)).sqrt_()
        root = nuisance_var.index_select(0, first).sqrt_().add_(moved)  # (U, C)
        return root.index_select(0, inverse)
    anchor = workspace.get("drift_anchor")
    fresh = (
        anchor is None
        or anchor["source"] is not source
        or anchor["calls"] >= DRIFT_ANCHOR_CALLS
        or anchor["position"].shape != position.shape
        or anchor["position"].dtype != position.dtype
        or anchor["root"].shape != nuisance_var.shape
    )
    if fresh:
        every = torch.arange(position.shape[0], device=position.device)
        moved = row_difference_sq_fast(position - origin, every).sqrt_()  # (C, C)
        anchor = workspace["drift_anchor"] = {
            "source": source,  # held, so that its identity cannot be reused
            "position": position.clone(),
            "root": nuisance_var.sqrt().add_(moved.index_select(0, labels)),  # (N, C)
            "calls": 0,
        }
    anchor["calls"] += 1
    root = anchor["root"]
    spread = root.clone() if rows is None else root.index_select(0, rows)
    if fresh:
        return spread
    step = row_norms_up(position - anchor["position"], rounded=True)  # (C,) ≥ ‖exact e_c‖
    own = step.index_select(0, labels if rows is None else labels.index_select(0, rows))
    return spread.add_(step[None, :]).add_(own[:, None])


def _stale_alpha(
    slack: Tensor,
    eligible: Tensor,
    geo: Competitors,
    wc: Tensor,
    cfg: CarrotConfig,
    factor_y: Tensor,
    scale: Tensor,
    work: torch.dtype,
) -> Tensor:
    """(B,) float64 α for class_cov noise when ``geo`` was built from another weight than the
    current ``wc`` (isotropic noise: :func:`_stale_alpha_isotropic`).

    The noise is ``P_N L_y ξ`` with the OLD projector, so for the CURRENT differences
    ``d_c = d_c⁰ + Δ_c`` every margin c ≠ y moves with variance ``s_c = ‖L_yᵀ P_N d_c‖²``. The
    union bound runs over all C − 1 classes. Kset classes (``P_N d_k⁰ = 0``):
    ``s_k = ‖L_yᵀ P_N Δ_k‖²`` exactly, K directions per distinct geometry row (per class in
    "class" mode). Others: ``s_c ≤ σ_max(L_y)²·(√s_c⁰ + ‖Δ_c‖)²`` (triangle inequality, cached
    ``s_c⁰``), the ``cfg.refine`` binding ones recomputed exactly. Only eligible rows are
    computed (the others get 0).
    """
    alpha = torch.zeros_like(slack[:, 0])
    rows = torch.nonzero(eligible).squeeze(1)  # host sync
    if rows.numel() == 0:
        return alpha
    geo, slack = geo.take(rows), slack.index_select(0, rows)
    first, inverse = distinct_rows(geo)  # per-class quantities once per class
    uniq = geo.take(first)
    y, kset = uniq.labels, uniq.kset
    c = wc.shape[0]
    eta = ETA_PER_COMPETITOR * kset.shape[1]
    use_basis = work == torch.float32  # the operator the noise is projected with
    scale = scale.index_select(0, rows)  # (R, 1), per class
    factor = factor_y.index_select(0, rows)

    def variance(where: Competitors, dirs: Tensor, at: Tensor) -> Tensor:
        """(N, r) per unit α of directions dirs (N, r, D) float64 for rows ``at`` of R."""
        proj = project_out(where, dirs.transpose(0, 1), use_basis=use_basis).to(torch.float64)
        return torch.einsum("bdq,rbd->rbq", factor[at], proj).square().sum(-1).T

    drift = wc - geo.weight  # (C, D) Δw
    moved = row_difference_sq_fast(drift, y)  # (U, C) ≥ ‖Δ_y − Δ_c‖²
    scale_u = scale[first]
    bound = (uniq.nuisance_var.sqrt() + moved.sqrt()).square() * (1 + 8 * _EPS64) * scale_u
    moved_k = moved.gather(1, kset)
    kvar = variance(uniq, drift[y][:, None, :] - drift[kset], first) + eta * scale_u * moved_k
    bound = bound.scatter(1, kset, kvar.minimum(bound.gather(1, kset))).index_select(0, inverse)
    labels = geo.labels
    constrained = torch.ones_like(geo.outside).scatter_(1, labels[:, None], False)
    q2 = tail_quantile_sq(cfg.delta, c - 1, cfg.quantile)
    length = row_difference_sq(wc, y).index_select(0, inverse)  # (R, C) ≥ ‖d_c‖²
    everyone = torch.arange(labels.shape[0], device=labels.device)

    def exact_var(idx: Tensor) -> Tensor:  # (R, r) classes → (R, r) exact s_c, rounded up
        dirs = wc[labels][:, None, :] - wc[idx]
        return variance(geo, dirs, everyone) + eta * scale * length.gather(1, idx)

    found = chance_alpha(
        slack, bound, constrained, n_out=c - 1, q2=q2, refine=cfg.refine, exact_var=exact_var
    )
    return alpha.index_copy(0, rows, found)


def carrot_augment_pre_ln(
    x: Tensor,
    y: Tensor,
    logits: Tensor,
    weight: Tensor,
    ln: nn.LayerNorm,
    cfg: CarrotConfig,
    *,
    generator: torch.Generator | None = None,
    bias: Tensor | None = None,
    measure: bool = True,
) -> CarrotOutput:
    """Pre-LN injection: noise on raw embeddings ``x`` (B, D) before the LayerNorm ``ln``.

    With J the Jacobian of ``ln`` at x, the noise ε_x is projected orthogonally to
    ``u_k = Jᵀ d_k`` (k ∈ Kset), so the first-order change ``J ε_x`` of z leaves the Kset
    margins unchanged; α uses the union bound on ``u_cᵀ ε_x`` for the other classes, refined
    exactly for the ``cfg.refine`` binding ones. First-order safe only: the noise is always
    capped at ``alpha_max`` (default ``PRE_LN_DEFAULT_CAP``) relative to ``‖x − mean(x)‖``.
    Returns x̃ rows in ``out.z`` (input dtype, differentiable w.r.t. x). Isotropic noise only.
    """
    _check_inputs(x, y, weight)
    if cfg.noise != "isotropic":
        raise ValueError('carrot_augment_pre_ln supports noise="isotropic" only')
    if tuple(ln.normalized_shape) != (x.shape[1],):
        raise ValueError(f"ln normalizes {tuple(ln.normalized_shape)}, x has D={x.shape[1]}")
    b, d = x.shape
    c = weight.shape[0]
    k = min(cfg.topk, c - 1)
    n_out = c - 1 - k
    with torch.no_grad():
        wc = centered_weight(weight)
        gram = wc @ wc.T
        jac = LayerNormJacobian.at(x, ln)
        slack = margin_slack(jac.output(), y, weight, cfg.gamma, x.dtype, bias)
        if cfg.mode == "sample":
            kset = top_competitors(logits, y, k)
        else:
            kset = nearest_classes(gram, k).index_select(0, y)

        def pull_back(idx: Tensor) -> Tensor:  # (B, r) classes → (B, r, D) Jᵀ d_c
            return jac.pull_back(wc[y][:, None, :] - wc[idx])

        basis, rank = orthonormal_rows(pull_back(kset))
        eligible = (slack > 0).all(dim=1) & (rank < d)
        bound = difference_sq(gram, y, d) * jac.gain_sq_bound()  # ≥ ‖P_N Jᵀ d_c‖²

        def exact_var(idx: Tensor) -> Tensor:
            dirs = pull_back(idx).transpose(0, 1)
            return project_out_explicit(basis, dirs).square().sum(-1).T

        alpha = chance_alpha(
            slack,
            bound,
            outside_mask(y, kset, c),
            n_out=n_out,
            q2=tail_quantile_sq(cfg.delta, n_out, cfg.quantile) if n_out else math.inf,
            refine=cfg.refine,
            exact_var=exact_var,
            eta=ETA_PER_COMPETITOR * k,
        )
        eps = torch.randn((cfg.aug_per_sample, b, d), generator=generator, device=x.device)
        noise = project_out_explicit(basis, eps.to(torch.float64))
        cap = cfg.alpha_max if cfg.alpha_max is not None else PRE_LN_DEFAULT_CAP
        alpha = cap_alpha(alpha, eligible, noise, jac.centred_norm(), cap)
    return _assemble(x, y, weight, cfg, alpha, noise, features=ln, bias=bias, measure=measure)


def carrot_loss(
    head_weight: Tensor,
    z: Tensor,
    y: Tensor,
    out: CarrotOutput,
    aug_weight: float,
    *,
    logits: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """``CE(W z + b, y) + aug_weight · CE(W z̃ + b, ỹ)``, a scalar.

    ``out.z`` is already normalized: it goes through ``W`` directly (no second LayerNorm).
    Pass ``logits = W z + b`` if already computed: the augmented logits are then
    ``logits[source] + W·out.delta`` (the same values and gradients as ``W z̃ + b``, one product
    fewer each way). Records ``out``'s violation rate from them when ``measure=False`` left it
    unset. With no augmented rows, the plain CE.
    """
    real = logits if logits is not None else F.linear(z, head_weight, bias)
    loss = F.cross_entropy(real, y)
    if out.y.shape[0] == 0 or aug_weight == 0:
        return loss
    if out.delta is not None:  # every row augmented once: source is 0..B−1, no gather
        base = real if out.every_row else real.index_select(0, out.source)
        aug = torch.addmm(base, out.delta, head_weight.T)
    else:
        aug = F.linear(out.z, head_weight, bias)
    if "violation_rate" not in out.diagnostics:
        out.record_violations(aug)
    return loss + aug_weight * F.cross_entropy(aug, out.y)


class CarrotAugment(nn.Module):
    """CARROT as a module. "class" mode caches the class geometry (Kset, projector pieces and the
    nuisance variances of every class pair) and recomputes it every ``cfg.refresh`` calls, or
    when the weight's shape, dtype or device changes.

    Between refreshes the noise is orthogonal to the competitor differences of the cached
    weight: Kset margins are exact for that weight only. The chance constraint still holds for
    the CURRENT weight: with a stale geometry the Kset classes join the union bound with a bound
    on their variance, ``‖d_k − d_k⁰‖² ≥ ‖P_N (d_k − d_k⁰)‖²`` (see :func:`augment_with_geometry`), so drift costs
    some α, never safety; ``refresh=1`` also keeps the Kset margins exact. "sample" mode and
    pre-LN injection are stateless and call :func:`carrot_augment` / :func:`carrot_augment_pre_ln`.
    """

    def __init__(self, cfg: CarrotConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.refresh_count = 0  # how many times the class geometry was computed
        self._geometry: Competitors | None = None
        self._key: tuple | None = None
        self._calls = 0  # calls served by the current geometry
        self._workspace: dict = {}  # scratch buffers reused between calls

    def forward(
        self,
        z: Tensor,
        y: Tensor,
        logits: Tensor,
        weight: Tensor,
        *,
        generator: torch.Generator | None = None,
        class_factor: Tensor | None = None,
        ln: nn.LayerNorm | None = None,
        bias: Tensor | None = None,
        logits_error: Tensor | None = None,
        measure: bool = True,
    ) -> CarrotOutput:
        """Same as :func:`carrot_augment` (``ln`` and raw ``x`` as ``z`` for pre-LN injection,
        which ignores ``logits_error``)."""
        cfg = self.cfg
        if cfg.injection == "pre_ln":
            if ln is None:
                raise ValueError('injection="pre_ln" needs the head LayerNorm: pass ln=...')
            return carrot_augment_pre_ln(
                z, y, logits, weight, ln, cfg, generator=generator, bias=bias, measure=measure
            )
        if cfg.mode == "sample":
            return carrot_augment(
                z,
                y,
                logits,
                weight,
                cfg,
                generator=generator,
                class_factor=class_factor,
                bias=bias,
                logits_error=logits_error,
                measure=measure,
                workspace=self._workspace,
            )
        _check_inputs(z, y, weight)
        return augment_with_geometry(
            z,
            y,
            weight,
            cfg,
            self.class_geometry(weight),
            generator=generator,
            class_factor=class_factor,
            workspace=self._workspace,
            bias=bias,
            logits=logits if logits_error is not None else None,
            logits_error=logits_error,
            measure=measure,
            rows=y,
        )

    @property
    def workspace(self) -> dict:
        """Scratch buffers reused between calls (also by callers batching heads)."""
        return self._workspace

    def class_geometry(self, weight: Tensor) -> Competitors:
        """Cached geometry of all C classes (N = C rows); counts one call toward the refresh."""
        key = (tuple(weight.shape), weight.dtype, weight.device)
        if self._geometry is None or key != self._key or self._calls >= self.cfg.refresh:
            self.refresh(weight)
        self._calls += 1
        return self._geometry

    @torch.no_grad()
    def refresh(self, weight: Tensor) -> None:
        """Recompute the class geometry from ``weight`` (C, D) now."""
        wc = centered_weight(weight)
        gram = wc @ wc.T
        classes = torch.arange(weight.shape[0], device=weight.device)
        kset = nearest_classes(gram, min(self.cfg.topk, weight.shape[0] - 1))
        geo = competitor_geometry(wc, gram, classes, kset, basis=True)
        self._geometry = dataclasses.replace(geo, source=weight.detach().clone())
        self._key = (tuple(weight.shape), weight.dtype, weight.device)
        self._calls = 0
        self.refresh_count += 1
        log.debug("CARROT class geometry refreshed (C=%d)", weight.shape[0])


def _assemble(
    z,
    y,
    weight,
    cfg: CarrotConfig,
    alpha: Tensor,
    noise: Tensor,
    *,
    features,
    bias=None,
    measure: bool = True,
    norms: Tensor | None = None,
) -> CarrotOutput:
    """:class:`CarrotOutput` from α (B,) float64 and unit-scale noise (a, B, D); ``measure``:
    compute ``violation_rate`` here (one (M, D) × (D, C) product); ``norms`` (B,) float32: the
    rows' norms if already computed (the noise-to-feature diagnostic)."""
    rows = torch.nonzero(alpha > 0).squeeze(1)  # host sync: M is data-dependent
    scale = alpha.sqrt().to(noise.dtype)
    every_row = rows.numel() == z.shape[0]
    if not every_row:
        noise, scale, z_rows = (
            noise.index_select(1, rows),
            scale.index_select(0, rows),
            z.index_select(0, rows),
        )
        norms = None if norms is None else norms.index_select(0, rows)
    else:  # every row augmented: no gathers
        z_rows = z
    delta = noise.mul_(scale[None, :, None]).to(z.dtype)  # (a, M, D); noise is ours
    source = rows.repeat(cfg.aug_per_sample)
    y_aug = y.index_select(0, source)
    zero = torch.zeros((), device=z.device)
    diag = {"frac_augmented": (alpha > 0).float().mean()}
    flat = delta.reshape(-1, z.shape[1])
    if features is None:  # post-LN: z̃ = z[source] + delta, built only if read
        out = CarrotOutput(y_aug, source, alpha.float(), diag, flat, cfg.gamma, rows=z_rows)
        out.every_row = every_row and cfg.aug_per_sample == 1
    else:  # pre-LN rows x̃: the noise is not the change of any head's input
        z_aug = (z_rows.unsqueeze(0) + delta).reshape(-1, z.shape[1])
        out = CarrotOutput(y_aug, source, alpha.float(), diag, gamma=cfg.gamma, _z=z_aug)
    if rows.numel() == 0:
        diag |= {"median_alpha": zero, "median_noise_ratio": zero, "violation_rate": zero}
        return out
    z_aug = out.z.detach() if measure else None  # built with autograd on, for the caller
    with torch.no_grad():
        base = torch.linalg.vector_norm(z_rows.detach().float(), dim=-1) if norms is None else norms
        ratio = torch.linalg.vector_norm(delta.float(), dim=-1).div_(base.clamp_min(1e-30))
        diag |= {
            "median_alpha": alpha.index_select(0, rows).float().median(),
            "median_noise_ratio": ratio.median(),
        }
        if measure:
            feats = z_aug if features is None else features(z_aug)
            out.record_violations(F.linear(feats.float(), weight.detach().float(), _float(bias)))
    return out


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def _check_inputs(z: Tensor, y: Tensor, weight: Tensor) -> None:
    if z.ndim != 2 or weight.ndim != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need z (B, D) and weight (C, D); got {tuple(z.shape)} and {tuple(weight.shape)}"
        )
    if y.shape != (z.shape[0],) or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"need integer labels y of shape ({z.shape[0]},); got {tuple(y.shape)} {y.dtype}"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"CARROT needs at least 2 classes; weight has {weight.shape[0]}")
