"""Stage 2's defaults, defined once: the head grid and the training settings (`TrainConfig`,
`LbfgsSettings`). The CLI, `run_probe`, the demo, the quality bench, the logistic baseline and the
benchmarks read them here. No torch import: ``carrot --help`` stays fast.

``λ`` is the L2 coefficient of every head's objective ``mean CE + λ/2 · ‖W‖²`` —
scikit-learn's ``C = 1 / (λ · n)`` on ``n`` training rows. Half-decades from 1e-6 (almost no
regularization: ``C`` ≈ 1e3 on 1 000 rows) to 1 (strong: few-shot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import InputError

LN_EPS = 1e-5
"""LayerNorm epsilon of every head (and of the head-independent normalization)."""
INIT_STD = 0.01
"""Std of a head's linear weight at init (DINOv2's linear heads use 0.01)."""

DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = tuple(float(f"{v:.3g}") for v in np.logspace(-6, 0, 13))
"""λ grid (13 values, log-spaced)."""
DEFAULT_LRS: tuple[float, ...] = (1e-3,)
"""Peak learning rates of minibatch heads (augmented heads, or every head of a streamed split).
Augmented heads start at their plain optimum: a small step suffices (measured on digits pixels
and the synthetic set: 1e-3 settles in the fewest steps and is never worse on validation than
3e-3 or 1e-2)."""
DEFAULT_AUGS: tuple[str, ...] = ("none", "carrot")
"""Augmentations in the bank; the plain heads guard against harm, validation picks."""

SOLVERS = ("auto", "lbfgs", "minibatch")
OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "bfloat16", "float16")
GTOL = 1e-8  # stop when max |gradient| ≤ GTOL (the objective is a mean over rows); float64
# makes it reachable: in float32 the line search stalls near 1e-6, and scikit-learn's 1e-4 stops
# weakly regularized heads far from their optimum (on separable few-shot rows: early-stopping
# artefacts 40 points off the optimum's accuracy, either way)
FTOL = 1e-9  # ... or when FTOL_STREAK steps in a row each lower f by ≤ FTOL · max(|f|, 1)
FTOL_STREAK = 3  # one tiny step alone is no proof: L-BFGS takes one now and then far from the
# optimum (a weakly regularized digits head stopped at max|g| 9e-5, f 1 % above its optimum)
MAX_ITER = 1000
HISTORY = 20
HISTORY_BYTES = 256 * 2**20  # the (s, y) history of all heads is kept under this


@dataclass(frozen=True)
class LbfgsSettings:
    """Stopping rule and memory of the solver."""

    max_iter: int = MAX_ITER  # iterations per head (each = one pass over the rows, or more)
    gtol: float = GTOL  # max-abs gradient tolerance
    ftol: float = FTOL  # relative decrease tolerance
    ftol_streak: int = FTOL_STREAK  # consecutive iterations the decrease test must hold
    history: int = HISTORY  # (s, y) pairs kept per head (fewer when HISTORY_BYTES is exceeded)
    precondition_kappa: float | None = 0.2  # (Σ + κI)⁻¹ starts L-BFGS; None: plain L-BFGS
    dtype: str = "float64"  # the solve's precision (heads are stored as float32)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise InputError(f"LbfgsSettings.dtype must be float32 or float64, got {self.dtype!r}")
        if self.max_iter < 1 or self.history < 1 or self.ftol_streak < 1:
            raise InputError("LbfgsSettings.max_iter, history and ftol_streak must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the head-bank training (per-head settings live in `HeadSpec`). The one source
    of the training defaults: the CLI, `run_probe`, the demo and the benchmarks read them here."""

    solver: str = "auto"  # auto: L-BFGS for plain heads when train is in memory | lbfgs | minibatch
    precondition: bool = True  # standardize LN(x) by train statistics (in the LayerNorm affine)
    train_layer_norm: bool = False  # let the minibatch path train the LN affine (non-convex)
    lbfgs: LbfgsSettings = field(default_factory=LbfgsSettings)  # plain heads' solver
    optimizer: str = "adam"  # minibatch path: "adam" | "sgd" (weight decay = L2 for both)
    epochs: int = 100  # minibatch path: maximum epochs
    batch_size: int = 256  # rows per minibatch step (shared by all heads)
    warmup_epochs: float = 1.0  # linear lr warm-up, then cosine decay to min_lr_ratio·lr
    min_lr_ratio: float = 0.0  # final lr as a fraction of each head's peak lr
    momentum: float = 0.9  # SGD momentum
    label_smoothing: float = 0.0  # used by heads whose spec leaves it None
    aug_warmup_epochs: int = 0  # no augmentation during the first minibatch epochs
    min_steps: int = 300  # small train sets: raise epochs to reach this many minibatch steps
    warm_start_rows: int = 65536  # streamed train: L-BFGS on this many rows starts every head
    aug_near_best: int | None = 1  # augmented heads only at the best plain λ ± this many grid steps
    tol: float = 1e-3  # minibatch convergence: relative change of the windowed epoch objective
    window: int = 5  # epochs per window of that test
    seed: int = 0  # batch order and augmentation noise
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"...
    dtype: str = "float32"  # autocast dtype of the minibatch matmuls: float32 | bfloat16 | float16
    eval_batch_size: int = 8192  # rows per evaluation chunk
    val_fraction: float = 0.1  # class-balanced validation carved from train when there is none

    def __post_init__(self) -> None:
        checks = [
            (self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver!r}"),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
            ),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (
                self.epochs >= 1 and self.batch_size >= 1,
                f"epochs and batch_size must be >= 1 ({self.epochs}, {self.batch_size})",
            ),
            (self.min_steps >= 0, f"min_steps must be >= 0, got {self.min_steps}"),
            (self.window >= 1, f"window must be >= 1, got {self.window}"),
            (
                self.warm_start_rows >= 1,
                f"warm_start_rows must be >= 1, got {self.warm_start_rows}",
            ),
            (
                self.aug_near_best is None or self.aug_near_best >= 0,
                f"aug_near_best must be >= 0 or None, got {self.aug_near_best}",
            ),
            (self.tol >= 0 and math.isfinite(self.tol), f"tol must be >= 0, got {self.tol}"),
            (
                0.0 < self.val_fraction < 1.0,
                f"val_fraction must be in (0, 1), got {self.val_fraction}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
