"""Evaluation (`carrot bench quality`): CARROT and its peers against plain heads and logistic
regression, paired per seed, over regimes and data sets.

``protocol`` (one regime × seed, and the summary with intervals) → ``suite`` (the built-in data
sets and the whole run) → ``report`` (markdown and plots); ``synthetic`` (data with a known
nuisance subspace).
"""

from pipeline._lazy import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(
    __name__,
    {
        "QualityConfig": "protocol",
        "run_quality": "protocol",
        "SuiteSettings": "suite",
        "run_suite": "suite",
        "write_quality_report": "report",
        "SyntheticConfig": "synthetic",
        "make_synthetic": "synthetic",
    },
)
