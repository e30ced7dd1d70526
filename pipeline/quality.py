"""The quality protocol: does CARROT help? Methods × regimes × seeds, paired against a plain head.

For every regime (k shots per class, or all training data) and seed:

1. the training rows are drawn with the seed (k per class; sampled subsets differ by seed);
2. **one head bank** holds every method's heads (method × lr × weight decay) and is fitted on
   the selection split(s) — in few-shot mode carved from the k shots only
   (`pipeline.fewshot.validation_folds`), with all data the class-balanced validation split;
3. each method's hyperparameters are chosen by the same rule (best mean validation balanced
   accuracy, ties by loss) among its own heads — test data is never looked at;
4. few-shot: each method's chosen head is refitted on all k shots for its median best epoch
   count; all data: the chosen head's best validation state is used as is;
5. test top-1 and mean per-class accuracy are recorded, and the **paired** difference to the
   plain head of the same seed (same shots, same initial weights).

The scikit-learn logistic regression is run on the same rows with its C chosen the same way.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from pipeline.augment import default_settings
from pipeline.baseline import layernorm_rows
from pipeline.carrot import CarrotConfig
from pipeline.errors import InputError
from pipeline.features import FeatureSet, Split
from pipeline.fewshot import sample_shots, validation_folds
from pipeline.heads import HeadSpec
from pipeline.metrics import mean_per_class_accuracy
from pipeline.predict import predict
from pipeline.train import TrainConfig, fit_bank, select_best

logger = logging.getLogger(__name__)

# name -> (augmentation registry name, settings); "logreg" is the scikit-learn baseline
METHODS: dict[str, tuple[str, Any]] = {
    "plain": ("none", None),
    "carrot-sample": ("carrot", CarrotConfig(mode="sample")),
    "carrot-class": ("carrot", CarrotConfig(mode="class")),
    "carrot-cov": ("carrot", CarrotConfig(mode="sample", noise="class_cov")),
    "carrot-preln": ("carrot", CarrotConfig(mode="sample", injection="pre_ln")),
    "carrot-capped": ("carrot", CarrotConfig(mode="sample", alpha_max=0.5)),
    "gaussian": ("gaussian", None),
    "isda": ("isda", None),
    "dc": ("dc", None),
    "mixup": ("mixup", None),
    "logreg": ("logreg", None),
}
BASELINE = "plain"
LOGREG_CS = tuple(float(c) for c in np.logspace(-2, 4, 7))


@dataclass(frozen=True)
class QualityConfig:
    """One quality run over one feature set."""

    methods: tuple[str, ...] = tuple(METHODS)  # "plain" is always included (the pairing)
    shots: tuple[int | None, ...] = (1, 2, 4, 8, 16, None)  # None = all training data
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # per-method grid (same for every method)
    weight_decays: tuple[float, ...] = (1e-2, 1e-1, 1.0, 3.0)  # strong decay matters in few-shot
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=256, min_steps=150)
    )  # small sets get more epochs: at least min_steps optimizer steps

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if BASELINE not in self.methods:
            object.__setattr__(self, "methods", (BASELINE, *self.methods))
        if len(self.seeds) < 1:
            raise InputError("give at least one seed")


@dataclass(frozen=True)
class Record:
    """Test result of one method in one regime and seed."""

    dataset: str
    method: str
    shots: int | None
    seed: int
    top1: float
    mean_per_class: float
    chosen: dict[str, Any]  # the selected hyperparameters


def _subset(split: Split, idx: np.ndarray) -> Split:
    t = torch.as_tensor(idx, dtype=torch.int64, device=split.X.device)
    return Split(X=split.X[t], y=split.y[t])


def _grid(cfg: QualityConfig, seed: int) -> tuple[list[HeadSpec], dict[str, list[int]]]:
    """All heads of all torch methods, and which heads belong to which method."""
    specs: list[HeadSpec] = []
    owner: dict[str, list[int]] = {}
    for method in cfg.methods:
        aug, settings = METHODS[method]
        if aug == "logreg":
            continue
        settings = settings if settings is not None else default_settings(aug)
        for lr in cfg.lrs:
            for wd in cfg.weight_decays:
                owner.setdefault(method, []).append(len(specs))
                specs.append(
                    HeadSpec(lr=lr, weight_decay=wd, aug=aug, aug_settings=settings, seed=seed)
                )
    return specs, owner


def _selection_splits(
    train: Split, val: Split | None, shots: int | None, seed: int
) -> list[tuple[Split, Split]]:
    if shots is None:
        assert val is not None
        return [(train, val)]
    folds = validation_folds(train.y.cpu().numpy(), shots, seed=seed)
    return [(_subset(train, tr), _subset(train, va)) for tr, va in folds]


def run_regime_seed(
    features: FeatureSet, cfg: QualityConfig, *, dataset: str, shots: int | None, seed: int
) -> list[Record]:
    """Every method of ``cfg`` in one regime and seed (see the module docstring)."""
    full_train = features.get("train")
    if shots is None:
        fs = features.with_validation(fraction=cfg.train.val_fraction, seed=seed)
        train, val = fs.get("train"), fs.get("val")
    else:
        idx = sample_shots(full_train.y.cpu().numpy(), shots, seed=seed)
        train, val = _subset(full_train, idx), None
    test = features.get("test")
    specs, owner = _grid(cfg, seed)
    splits = _selection_splits(train, val, shots, seed)
    scores = np.zeros((len(splits), len(specs), 3))  # balanced acc, loss, best epoch
    fitted = None
    for f, (tr, va) in enumerate(splits):
        fold = FeatureSet(
            splits={"train": tr, "val": va},
            class_names=features.class_names,
            device=features.device,
        )
        tcfg = replace(cfg.train, seed=cfg.train.seed + seed * 101 + f)
        fitted = fit_bank(fold, specs, tcfg, val_split="val")
        for h, v in enumerate(fitted.val):
            scores[f, h] = (v["balanced_accuracy"], v["loss"], v["best_epoch"])
    records = []
    y_test = test.y.cpu().numpy()
    for method, heads in owner.items():
        sel = [
            {
                "balanced_accuracy": float(scores[:, h, 0].mean()),
                "loss": float(scores[:, h, 1].mean()),
            }
            for h in heads
        ]
        h = heads[select_best(sel)]
        if shots is None:
            head = fitted.bank.head(h)  # best validation state
        else:
            epochs = int(np.median(scores[:, h, 2])) + 1
            one = FeatureSet(
                splits={"train": train}, class_names=features.class_names, device=features.device
            )
            tcfg = replace(
                cfg.train,
                epochs=epochs,
                patience=None,
                min_steps=0,
                seed=cfg.train.seed + seed * 101,
            )
            head = fit_bank(one, [specs[h]], tcfg, val_split=None).bank.head(0)
        pred, _ = predict(head, test.X)
        records.append(
            Record(
                dataset,
                method,
                shots,
                seed,
                float((pred == y_test).mean()),
                mean_per_class_accuracy(y_test, pred),
                {"lr": specs[h].lr, "weight_decay": specs[h].weight_decay},
            )
        )
    if "logreg" in cfg.methods:
        records.append(_logreg(splits, train, test, dataset=dataset, shots=shots, seed=seed))
    return records


def _logreg(
    splits, train: Split, test: Split, *, dataset: str, shots: int | None, seed: int
) -> Record:
    """scikit-learn logistic regression on LayerNorm'd rows, C chosen on the same splits."""

    def fit(split: Split, C: float) -> LogisticRegression:
        X = layernorm_rows(split.X.cpu().numpy())
        with (
            warnings.catch_warnings()
        ):  # large C on separable few-shot data: lbfgs stops at max_iter
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=C, max_iter=1000).fit(X, split.y.cpu().numpy())

    def bal(model, split: Split) -> float:
        pred = model.predict(layernorm_rows(split.X.cpu().numpy()))
        return mean_per_class_accuracy(split.y.cpu().numpy(), pred)

    # one BLAS thread: these fits are tiny, and threads only add waits (20× slower measured here)
    with threadpool_limits(limits=1):
        score = {C: np.mean([bal(fit(tr, C), va) for tr, va in splits]) for C in LOGREG_CS}
        best = max(LOGREG_CS, key=lambda C: (score[C], -C))
        model = fit(train, best)
    pred = model.predict(layernorm_rows(test.X.cpu().numpy()))
    y = test.y.cpu().numpy()
    return Record(
        dataset,
        "logreg",
        shots,
        seed,
        float((pred == y).mean()),
        mean_per_class_accuracy(y, pred),
        {"C": best},
    )


def run_quality(
    features: FeatureSet,
    cfg: QualityConfig,
    *,
    dataset: str,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """All regimes × seeds × methods over ``features`` (needs ``train`` and ``test`` splits)."""
    for name in ("train", "test"):
        if not features.has(name):
            raise InputError(f"{dataset}: the quality protocol needs a {name!r} split")
    records: list[Record] = []
    for shots in cfg.shots:
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            out = run_regime_seed(features, cfg, dataset=dataset, shots=shots, seed=seed)
            logger.info(
                "%s shots=%s seed=%d: %.1f s", dataset, shots, seed, time.perf_counter() - t0
            )
            for r in out:
                if on_record is not None:
                    on_record(r)
            records += out
    return records


# ----------------------------------------------------------------------------- statistics
def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of the mean (zero width for n = 1)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def summarize(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per dataset × regime × method: mean and 95 % interval of top-1 and mean per-class
    accuracy, and the paired per-seed difference to the plain head (mean, interval, wins)."""
    by_key: dict[tuple[str, int | None, str], dict[int, Record]] = {}
    for r in records:
        by_key.setdefault((r.dataset, r.shots, r.method), {})[r.seed] = r
    rows = []
    for (dataset, shots, method), runs in by_key.items():
        seeds = sorted(runs)
        top1 = t_interval([runs[s].top1 for s in seeds])
        mpc = t_interval([runs[s].mean_per_class for s in seeds])
        base = by_key.get((dataset, shots, BASELINE), {})
        paired = [runs[s].top1 - base[s].top1 for s in seeds if s in base]
        diff = t_interval(paired) if paired else (float("nan"),) * 3
        rows.append(
            {
                "dataset": dataset,
                "shots": "all" if shots is None else shots,
                "method": method,
                "seeds": len(seeds),
                "top1": top1[0],
                "top1_lo": top1[1],
                "top1_hi": top1[2],
                "mean_per_class": mpc[0],
                "mpc_lo": mpc[1],
                "mpc_hi": mpc[2],
                "diff_vs_plain": diff[0],
                "diff_lo": diff[1],
                "diff_hi": diff[2],
                "wins": int(sum(d > 1e-9 for d in paired)),
                "losses": int(sum(d < -1e-9 for d in paired)),
            }
        )
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["shots"] == "all",
            r["shots"] if r["shots"] != "all" else 0,
            order.get(r["method"], 99),
        )
    )
    return rows
