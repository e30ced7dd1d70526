"""The batched L-BFGS solver: exact objective and gradient, scikit-learn's optimum, the
covariance preconditioner (same optimum, fewer iterations), independent heads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from pipeline.defaults import LbfgsSettings
from pipeline.heads import lbfgs
from pipeline.heads.lbfgs import (
    CovariancePreconditioner,
    lambda_from_C,
    softmax_objective,
    solve_softmax_lbfgs,
)


def correlated(n: int, d: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized rows dominated by a few shared factors, the classes told apart in the
    low-variance rest (like cached embeddings of a random-init backbone): ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    shared = torch.randn(n, 3, generator=g) @ torch.randn(3, d, generator=g) * 5
    classes = torch.randn(c, d, generator=g)[y] * 0.3
    X = shared + classes + 0.3 * torch.randn(n, d, generator=g)
    X = (X - X.mean(0)) / X.std(0)
    return X.double(), y


@settings(deadline=None, max_examples=30)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    c=st.integers(2, 5),
    h=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_objective_and_gradient_equal_autograd(n, d, c, h, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    W = torch.randn(h, c, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(h, c, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(h, generator=g, dtype=torch.float64)
    smooth = torch.rand(h, generator=g, dtype=torch.float64) * 0.5
    f, gW, gb = softmax_objective(X, y, W.detach(), b.detach(), lam, smooth)
    ref = torch.stack(
        [
            F.cross_entropy(X @ W[i].T + b[i], y, label_smoothing=float(smooth[i]))
            + 0.5 * lam[i] * W[i].square().sum()
            for i in range(h)
        ]
    )
    ref.sum().backward()
    torch.testing.assert_close(f, ref.detach())
    torch.testing.assert_close(gW, W.grad)
    torch.testing.assert_close(gb, b.grad)


def test_heads_reach_scikit_learns_optimum_in_one_batch():
    X, y = correlated(400, 24, 5)
    Cs = [1e-2, 1.0, 1e2]
    lam = torch.tensor([lambda_from_C(C, len(y)) for C in Cs], dtype=torch.float64)
    r = solve_softmax_lbfgs(X, y, 5, lam, settings=LbfgsSettings(gtol=1e-8, max_iter=5000))
    assert r.converged.all()
    for h, C in enumerate(Cs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m = LogisticRegression(C=C, tol=1e-10, max_iter=50_000).fit(X.numpy(), y.numpy())
        f_ref, _, _ = softmax_objective(
            X,
            y,
            torch.as_tensor(m.coef_)[None],
            torch.as_tensor(m.intercept_)[None],
            lam[h : h + 1],
            torch.zeros(1, dtype=torch.float64),
            with_grad=False,
        )
        assert float(r.objective[h]) <= float(f_ref[0]) * (1 + 1e-5)


@pytest.mark.parametrize(("n", "d"), [(300, 40), (30, 60)])  # N ≥ D, and the low-rank form
def test_preconditioner_is_the_inverse_of_the_regularized_covariance(n, d, monkeypatch):
    monkeypatch.setattr(lbfgs, "DROP_BELOW", 0.0)  # every direction kept: M exactly
    X, _ = correlated(n, d, 3)
    kappa = 0.2
    pre = CovariancePreconditioner.fit(X, kappa)
    M = torch.linalg.inv(X.T @ X / n + kappa * torch.eye(d, dtype=torch.float64))
    theta = torch.randn(2, 3 * d + 3, dtype=torch.float64)
    got = pre.apply(theta, 3, d)
    W = theta[:, : 3 * d].reshape(2, 3, d)
    torch.testing.assert_close(got[:, : 3 * d].reshape(2, 3, d), W @ M)
    torch.testing.assert_close(got[:, 3 * d :], theta[:, 3 * d :])  # bias untouched
    torch.testing.assert_close(pre.quadratic(theta, 3, d), (theta * got).sum(1))


@pytest.mark.parametrize(("n", "d"), [(300, 40), (30, 60)])
def test_dropped_directions_raise_the_preconditioner_by_at_most_the_stated_factor(n, d):
    """With the weak directions dropped, θᵀM̃θ / θᵀMθ lies in [1, 1 + DROP_BELOW] for every θ
    (M̃ and M share eigenvectors; M̃ has 1/κ where M has 1/(e + κ), e ≤ DROP_BELOW·κ)."""
    X, _ = correlated(n, d, 3)
    kappa = 0.2
    pre = CovariancePreconditioner.fit(X, kappa)
    assert pre.V.shape[1] < min(n, d)  # some direction was dropped: the bound is exercised
    M = torch.linalg.inv(X.T @ X / n + kappa * torch.eye(d, dtype=torch.float64))
    theta = torch.randn(64, 3 * d + 3, dtype=torch.float64)
    theta[:, 3 * d :] = 0
    W = theta[:, : 3 * d].reshape(64, 3, d)
    exact = (W * (W @ M)).sum((1, 2))
    ratio = pre.quadratic(theta, 3, d) / exact
    assert float(ratio.min()) >= 1 - 1e-12
    assert float(ratio.max()) <= 1 + lbfgs.DROP_BELOW + 1e-12
    torch.testing.assert_close(pre.quadratic(theta, 3, d), (theta * pre.apply(theta, 3, d)).sum(1))


def test_preconditioning_reaches_the_same_optimum_in_fewer_iterations():
    X, y = correlated(600, 48, 6)
    lam = torch.tensor([1e-5, 1e-3, 1e-1], dtype=torch.float64)
    tight = LbfgsSettings(gtol=1e-8, max_iter=20_000, precondition_kappa=None)
    ref = solve_softmax_lbfgs(X, y, 6, lam, settings=tight)
    plain = solve_softmax_lbfgs(X, y, 6, lam, settings=LbfgsSettings(precondition_kappa=None))
    pre = solve_softmax_lbfgs(X, y, 6, lam, settings=LbfgsSettings())
    assert pre.converged.all()
    assert (pre.objective - ref.objective).abs().max() <= 1e-4
    assert int(pre.iterations.sum()) * 2 <= int(plain.iterations.sum())


def test_heads_are_independent_of_each_other():
    X, y = correlated(200, 16, 4)
    lam = torch.tensor([1e-4, 1e-2, 1.0], dtype=torch.float64)
    together = solve_softmax_lbfgs(X, y, 4, lam)
    for h in range(3):
        alone = solve_softmax_lbfgs(X, y, 4, lam[h : h + 1])
        torch.testing.assert_close(together.W[h], alone.W[0], rtol=1e-6, atol=1e-8)
        assert int(together.iterations[h]) == int(alone.iterations[0])


def test_lambda_from_C_rejects_bad_values():
    assert lambda_from_C(2.0, 50) == pytest.approx(0.01)
    for bad in (0.0, -1.0, np.inf):
        with pytest.raises(ValueError):
            lambda_from_C(bad, 10)


@pytest.mark.parametrize("streak", [1, 3])
def test_decrease_test_stops_a_head_only_after_its_streak_of_small_steps(streak):
    """With the gradient test off (gtol 0), a head stops as converged only after ``ftol_streak``
    consecutive steps each lowered f by ≤ ftol relative (one tiny step is no proof)."""
    X, y = correlated(300, 12, 4, seed=3)
    lam = torch.tensor([1e-6, 1e-4, 1e-2], dtype=torch.float64)
    cfg = LbfgsSettings(gtol=0.0, ftol=1e-7, ftol_streak=streak, max_iter=2000)
    r = solve_softmax_lbfgs(X, y, 4, lam, settings=cfg)
    assert r.converged.all() and (r.iterations < cfg.max_iter).all()
    for h in range(3):
        f = r.trace[: int(r.iterations[h]) + 1, h]
        small = (f[:-1] - f[1:]) <= cfg.ftol * f[1:].abs().clamp_min(1)
        assert small[-streak:].all()  # the streak that stopped it ...
        if streak > 1:  # ... and no earlier one
            runs = small.int().unfold(0, streak, 1).sum(1)
            assert (runs[:-1] < streak).all()
