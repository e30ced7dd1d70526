"""The binomial upper bound the δ tests use: its definition, and SciPy agreeing with the sum."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from binomial_bounds import binomial_power_miss, binomial_upper, binomial_upper_exact

CASES = [(1, 0.05, 0.01), (10, 0.5, 0.3), (64, 0.05, 1e-6), (2000, 0.05, 1e-8), (500, 0.2, 1e-3)]


def _tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) > k), summed in exact rational arithmetic."""
    q = Fraction(str(p))
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(k + 1, n + 1)))


@pytest.mark.parametrize(("n", "p", "alpha"), CASES)
def test_exact_bound_is_the_smallest_count_with_tail_at_most_alpha(n, p, alpha):
    k = binomial_upper_exact(n, p, alpha)
    assert _tail(n, p, k) <= alpha * (1 + 1e-9)
    if k > 0:
        assert _tail(n, p, k - 1) > alpha


@pytest.mark.parametrize(("n", "p", "alpha"), CASES)
def test_scipy_agrees_with_the_exact_sum(n, p, alpha):
    pytest.importorskip("scipy")
    assert binomial_upper(n, p, alpha) == binomial_upper_exact(n, p, alpha)


def test_degenerate_rates_and_bad_arguments():
    assert binomial_upper_exact(100, 0.0, 1e-6) == 0
    assert binomial_upper_exact(100, 1.0, 1e-6) == 100
    with pytest.raises(ValueError):
        binomial_upper_exact(10, 0.5, 0.0)


def test_power_miss_is_the_pass_probability_of_the_larger_rate():
    n, p, q, alpha = 200, 0.05, 0.15, 1e-4
    k = binomial_upper(n, p, alpha)
    assert binomial_power_miss(n, p, q, alpha) == pytest.approx(1 - _tail(n, q, k), rel=1e-9)
    assert binomial_power_miss(n, p, p, alpha) >= 1 - alpha
