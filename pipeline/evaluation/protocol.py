"""The quality protocol: does CARROT help? Methods × regimes × seeds, paired against a plain head.

For every regime (k shots per class, or all training data) and seed:

1. the training rows are drawn with the seed (k per class; sampled subsets differ by seed);
2. every method's heads (method × lr × λ) are searched together by
   `pipeline.heads.search.search_grid` on the selection split(s) — in few-shot mode carved from
   the k shots only (`pipeline.heads.fewshot.validation_folds`), with all data the class-balanced
   validation split: plain heads by L-BFGS to their optimum, augmented heads from the plain
   solution of their λ, near the best plain λ;
3. each method's hyperparameters are chosen by the same rule (best mean validation balanced
   accuracy, ties by loss) among its own heads — test data is never looked at;
4. few-shot: each method's chosen head is refitted on all k shots by the same procedure; all
   data: the chosen head is used as fitted;
5. test top-1 and mean per-class accuracy are recorded, and the **paired** difference to the
   plain head of the same seed (same shots, same starting point).

The logistic baseline (`pipeline.heads.baseline`, the one every command uses) runs on the same rows
with its C chosen on the same splits over the same λ grid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from pipeline.augment.carrot import CarrotConfig
from pipeline.augment.registry import default_settings
from pipeline.defaults import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS
from pipeline.errors import InputError
from pipeline.heads.bank import HeadSpec
from pipeline.heads.baseline import BaselineConfig, select_logistic
from pipeline.heads.features import FeatureSet, Split
from pipeline.heads.fewshot import sample_shots, validation_folds
from pipeline.heads.metrics import mean_per_class_accuracy
from pipeline.heads.predict import predict
from pipeline.heads.search import search_grid
from pipeline.heads.train import TrainConfig, fit_bank

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


@dataclass(frozen=True)
class QualityConfig:
    """One quality run over one feature set."""

    methods: tuple[str, ...] = tuple(METHODS)  # "plain" is always included (the pairing)
    shots: tuple[int | None, ...] = (1, 2, 4, 8, 16, None)  # None = all training data
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lrs: tuple[float, ...] = DEFAULT_LRS  # minibatch heads' grid (the same for every method)
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS  # λ grid (also the logreg's C grid)
    train: TrainConfig = field(default_factory=TrainConfig)  # the probe's training defaults

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


def _grid(cfg: QualityConfig, seed: int) -> tuple[list[HeadSpec], dict[str, list[HeadSpec]]]:
    """All heads of all torch methods, and which specs belong to which method (plain heads take
    one lr: L-BFGS does not use it)."""
    specs: list[HeadSpec] = []
    owner: dict[str, list[HeadSpec]] = {}
    for method in cfg.methods:
        aug, settings = METHODS[method]
        if aug == "logreg":
            continue
        settings = settings if settings is not None else default_settings(aug)
        for lr in cfg.lrs[:1] if aug == "none" else cfg.lrs:
            for wd in cfg.weight_decays:
                spec = HeadSpec(lr=lr, weight_decay=wd, aug=aug, aug_settings=settings, seed=seed)
                owner.setdefault(method, []).append(spec)
                specs.append(spec)
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
    folds = [
        FeatureSet(
            splits={"train": tr, "val": va},
            class_names=features.class_names,
            device=features.device,
        )
        for tr, va in splits
    ]
    tcfg = replace(cfg.train, seed=cfg.train.seed + seed * 101)
    search = search_grid(folds, specs, tcfg)
    records = []
    y_test = test.y.cpu().numpy()
    for method, method_specs in owner.items():
        heads = [h for h, s in enumerate(search.specs) if s in method_specs]
        if not heads:
            continue  # every head of this method was left out by the two-stage rule
        h = search.best(among=heads)
        if shots is None:
            head = search.folds[0].bank.head(h)  # fitted on the whole training split already
        else:  # refit on all k shots by the procedure that was scored
            one = FeatureSet(
                splits={"train": train}, class_names=features.class_names, device=features.device
            )
            head = fit_bank(one, [search.specs[h]], tcfg, val_split=None).bank.head(0)
        pred, _ = predict(head, test.X)
        records.append(
            Record(
                dataset,
                method,
                shots,
                seed,
                float((pred == y_test).mean()),
                mean_per_class_accuracy(y_test, pred),
                {"lr": search.specs[h].lr, "weight_decay": search.specs[h].weight_decay},
            )
        )
    if "logreg" in cfg.methods:
        records.append(
            _logreg(splits, train, test, cfg, features.num_classes, dataset, shots, seed)
        )
    return records


def _logreg(
    splits: list[tuple[Split, Split]],
    train: Split,
    test: Split,
    cfg: QualityConfig,
    num_classes: int,
    dataset: str,
    shots: int | None,
    seed: int,
) -> Record:
    """The logistic baseline (`pipeline.heads.baseline`), C chosen on the same selection splits."""

    def arrays(s: Split) -> tuple[np.ndarray, np.ndarray]:
        return s.X.cpu().numpy(), s.y.cpu().numpy()

    folds = [(*arrays(tr), *arrays(va)) for tr, va in splits]
    final = (folds[0][0], folds[0][1]) if shots is None else arrays(train)
    result = select_logistic(
        folds,
        final,
        arrays(test),
        num_classes=num_classes,
        cfg=BaselineConfig(lambdas=tuple(w for w in cfg.weight_decays if w > 0)),
    )
    probs = result.test_probs
    y = test.y.cpu().numpy()
    pred = probs.argmax(1)
    return Record(
        dataset,
        "logreg",
        shots,
        seed,
        float((pred == y).mean()),
        mean_per_class_accuracy(y, pred),
        {"C": result.best_C},
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
