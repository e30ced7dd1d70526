"""K = C − 1: one shared nuisance basis for every row equals the per-row geometry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.augment import CarrotConfig, carrot_augment
from pipeline.augment.nuisance import (
    centered_weight,
    centred_span_basis,
    competitor_geometry,
    orthonormal_rows,
    project_out,
    shared_geometry,
)


def _problem(b: int, d: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    z = 3 * w[y] + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return z, y, w


@pytest.mark.parametrize(("d", "c"), [(16, 5), (8, 8), (6, 11)])  # C < D, C = D, C > D
def test_shared_basis_projects_like_the_per_row_geometry(d, c):
    _, y, w = _problem(12, d, c)
    wc = centered_weight(w)
    others = torch.stack([torch.tensor([k for k in range(c) if k != int(t)]) for t in y])
    per_row = competitor_geometry(wc, wc @ wc.T, y, others)
    shared = shared_geometry(wc, y)
    assert torch.equal(shared.kset, others) and torch.equal(shared.rank, per_row.rank)
    v = torch.randn(3, 12, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(project_out(shared, v), project_out(per_row, v), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_competitor_margins_stay_exact_with_the_shared_basis(dtype):
    z, y, w = _problem(64, 24, 6)
    z, w = z.to(dtype), w.to(dtype)
    cfg = CarrotConfig(topk=50, aug_per_sample=4)  # K = min(50, C − 1) = C − 1
    out = carrot_augment(z, y, z @ w.T, w, cfg, generator=torch.Generator().manual_seed(2))
    assert out.z.shape[0] > 0 and float(out.alpha.max()) > 0
    noise = (out.z - z[out.source]).double()
    diffs = w.double()[out.y][:, None, :] - w.double()[None, :, :]  # (M, C, D)
    moved = (diffs @ noise[:, :, None]).squeeze(-1).abs()  # every margin's change
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert float(moved.max()) <= tol * float(noise.norm(dim=1).max() * w.double().norm(dim=1).max())
    assert float(noise.norm(dim=1).max()) > 0.1  # the noise is not trivially zero


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 12),
    st.integers(2, 24),
    st.sampled_from(["random", "duplicate", "collinear", "near_duplicate", "ill_conditioned"]),
    st.integers(0, 2**16),
)
def test_centred_span_basis_spans_what_orthonormal_rows_spans(n, c, d, kind, seed):
    """The Cholesky basis of the first C − 1 centred rows is orthonormal, has the rank of
    the full eigh form, and the same projector — also with duplicate, collinear, nearly
    duplicate and barely separate class weights (rank deficient or ill-conditioned Grams) and
    C − 1 ≥ D."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, c, d, generator=g, dtype=torch.float64)
    if kind == "duplicate":
        w[:, -1] = w[:, 0]
    elif kind == "collinear":
        w[:, 1] = 3 * w[:, 0]
    elif kind == "near_duplicate":  # dropped: the gap is below RTOL
        w[:, 1] = w[:, 0] + 1e-7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "ill_conditioned":  # kept, with a Gram condition number near 1e8
        w[:, 1] = w[:, 0] + 1e-4 * torch.randn(n, d, generator=g, dtype=torch.float64)
    wc = centered_weight(w)
    ours, rank = centred_span_basis(wc)
    ref, ref_rank = orthonormal_rows(wc)
    assert torch.equal(rank, ref_rank)
    gram = ours @ ours.transpose(1, 2)
    kept = gram.diagonal(dim1=1, dim2=2) > 0.5  # dropped directions are zero rows
    torch.testing.assert_close(gram, torch.diag_embed(kept.double()), atol=1e-9, rtol=0)
    proj, ref_proj = ours.transpose(1, 2) @ ours, ref.transpose(1, 2) @ ref  # (n, D, D)
    torch.testing.assert_close(proj, ref_proj, atol=1e-7, rtol=0)
