"""Stage 2: LayerNorm + Linear heads over cached features, many at once.

``features`` (in-memory or streamed splits of a store) → ``bank`` (the heads, the grid as data)
→ ``precondition``, ``lbfgs``, ``optim``, ``train`` (fit a bank to convergence) → ``search``
(the two-stage grid search) and ``fewshot`` → ``baseline`` (scikit-learn's logistic regression,
the reference) → ``metrics``, ``io`` (head files and run folders), ``predict`` → ``probe`` (all of
it behind one call).
"""

from pipeline._lazy import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(
    __name__,
    {
        "FeatureSet": "features",
        "StreamingFeatures": "features",
        "Split": "features",
        "Head": "bank",
        "HeadBank": "bank",
        "HeadSpec": "bank",
        "HeadGrid": "bank",
        "standardizing_affine": "precondition",
        "solve_softmax_lbfgs": "lbfgs",
        "fit_bank": "train",
        "FitOutput": "train",
        "select_best": "train",
        "search_grid": "search",
        "train_head_bank": "search",
        "TrainResult": "search",
        "run_fewshot": "fewshot",
        "FewShotResult": "fewshot",
        "BaselineConfig": "baseline",
        "fit_logistic_baseline": "baseline",
        "classification_metrics": "metrics",
        "save_head": "io",
        "load_head": "io",
        "write_outputs": "io",
        "ProbeSettings": "probe",
        "run_probe": "probe",
    },
)
