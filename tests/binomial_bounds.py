"""Upper bounds on a count of independent failures, for tests of a rate ≤ p guarantee.

A test that checks "P(violation) ≤ p" from ``n`` independent draws asserts that the number of
violations is at most :func:`binomial_upper(n, p, alpha) <binomial_upper>`: if the guarantee
holds it fails with probability at most ``alpha`` (split ``alpha`` over the comparisons of a
test file, Bonferroni, for a family-wise error). :func:`binomial_power_miss` says how likely a
rate ``q > p`` would still pass, so a test can show that its ``n`` is large enough to fail.
"""

from __future__ import annotations

import math

__all__ = ["binomial_power_miss", "binomial_upper", "binomial_upper_exact"]


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    log_choose = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return log_choose + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_upper_exact(n: int, p: float, alpha: float) -> int:
    """Smallest ``k`` with ``P(Binomial(n, p) > k) ≤ alpha``, by summing the upper tail."""
    if n < 0 or not 0.0 <= p <= 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n ≥ 0, p in [0, 1], alpha in (0, 1); got {n}, {p}, {alpha}")
    k, tail = n, 0.0  # tail = P(X > k)
    while k > 0:
        wider = tail + math.exp(_log_pmf(k, n, p))  # P(X > k - 1)
        if wider > alpha:
            break
        k, tail = k - 1, wider
    return k


def binomial_upper(n: int, p: float, alpha: float) -> int:
    """Smallest ``k`` with ``P(Binomial(n, p) > k) ≤ alpha``: ``scipy.stats.binom.ppf`` when
    SciPy is installed, else :func:`binomial_upper_exact` (the two agree; tested)."""
    try:
        from scipy.stats import binom
    except ImportError:
        return binomial_upper_exact(n, p, alpha)
    return int(binom.ppf(1.0 - alpha, n, p))


def binomial_power_miss(n: int, p: float, q: float, alpha: float) -> float:
    """``P(Binomial(n, q) ≤ binomial_upper(n, p, alpha))``: how often a true rate ``q`` passes
    the bound made for ``p`` (small: the test can fail when the rate is ``q``)."""
    limit = binomial_upper(n, p, alpha)
    return min(1.0, sum(math.exp(_log_pmf(k, n, q)) for k in range(limit + 1)))
