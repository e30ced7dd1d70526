"""``carrot bench quality``: the data sets, the regimes, and the report, in one call.

Built-in data sets (offline):

- ``synthetic-nuisance``: the synthetic fine-grained generator (`pipeline.evaluation.synthetic`) with strong
  shared nuisance variation — the regime CARROT is designed for;
- ``synthetic-clean``: the same classes with weak nuisance — a control where there is little
  nuisance to be robust to;
- ``digits``: scikit-learn's digits embedded by a randomly initialised resnet18 at 64 px
  (stage 1, cached in the store root like any other store).

Any store (``--store URL``) is run through the same protocol. With ``partial`` the partially
frozen regime runs instead (`pipeline.evaluation.partial`): on the built-in digits activation
cache and on any ``--store`` that is one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pipeline.defaults import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS
from pipeline.evaluation.partial import (
    DIGITS_CACHE,
    PartialConfig,
    check_seeds_fit,
    digits_cache,
    run_partial,
)
from pipeline.evaluation.protocol import METHODS, QualityConfig, Record, run_quality, summarize
from pipeline.evaluation.report import markdown, write_quality_report
from pipeline.evaluation.synthetic import SyntheticConfig, make_synthetic
from pipeline.heads.features import FeatureSet
from pipeline.heads.top import cache_point
from pipeline.heads.train import TrainConfig
from pipeline.threads import torch_threads

logger = logging.getLogger(__name__)
C = TypeVar("C", QualityConfig, PartialConfig)

SYNTHETIC: dict[str, SyntheticConfig] = {
    "synthetic-nuisance": SyntheticConfig(
        classes=20,
        dim=128,
        signal_rank=16,
        separation=6.0,
        nuisance_rank=32,
        nuisance_strength=3.0,
        noise=0.5,
        train_per_class=16,
        test_per_class=30,
        seed=0,
    ),
    "synthetic-clean": SyntheticConfig(
        classes=20,
        dim=128,
        signal_rank=16,
        separation=6.0,
        nuisance_rank=32,
        nuisance_strength=0.3,
        noise=0.5,
        train_per_class=16,
        test_per_class=30,
        seed=0,
    ),
}
QUICK_SYNTHETIC = ("synthetic-nuisance",)
DIGITS_BACKBONE, DIGITS_IMAGE_SIZE = "resnet18", 64


@dataclass(frozen=True)
class SuiteSettings:
    """What ``carrot bench quality`` runs."""

    quick: bool = False  # fewer regimes, seeds and data sets (< 5 min on a 2-core CPU)
    stores: tuple[str, ...] = ()  # user stores (URLs) run through the same protocol
    builtin: bool = True  # the synthetic and digits data sets
    methods: tuple[str, ...] | None = None  # None: all of pipeline.evaluation.protocol.METHODS
    shots: tuple[int | None, ...] | None = None  # None: (1, 2, 4, 8, 16, all) or quick's
    seeds: int | None = None  # None: 5 (quick: 3)
    device: str = "cpu"
    partial: bool = False  # the partially frozen regime (pipeline.evaluation.partial) instead


def quality_config(s: SuiteSettings) -> QualityConfig:
    """The protocol's settings; quick mode trims regimes, seeds and the grid, not the methods."""
    train = TrainConfig(device=s.device)
    if s.quick:
        cfg = QualityConfig(
            shots=(1, 8, None),
            seeds=(0, 1, 2),
            lrs=DEFAULT_LRS[:1],
            weight_decays=DEFAULT_WEIGHT_DECAYS[::2],
            train=train,
        )
    else:
        cfg = QualityConfig(train=train)
    return _with_options(cfg, s)


def _with_options(cfg: C, s: SuiteSettings) -> C:
    """``cfg`` with the user's ``--methods``, ``--shots`` and ``--seeds``, validated again."""
    given = {"methods": s.methods, "shots": s.shots}
    if s.seeds is not None:
        given["seeds"] = tuple(range(s.seeds))
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    return type(cfg)(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__})


def builtin_datasets(s: SuiteSettings) -> dict[str, FeatureSet]:
    """The synthetic data sets and digits (embedded with stage 1 when not cached)."""
    out = {}
    for name in QUICK_SYNTHETIC if s.quick else SYNTHETIC:
        d = make_synthetic(SYNTHETIC[name])
        out[name] = FeatureSet.from_arrays(
            {split: d.select(split) for split in ("train", "test")},
            class_names=d.class_names,
            device=s.device,
        )
    out[f"digits ({DIGITS_BACKBONE} random init, {DIGITS_IMAGE_SIZE}px)"] = _digits(s.device)
    return out


def _digits(device: str) -> FeatureSet:
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, run_embedding
    from stores import open_store

    summary = run_embedding(
        EmbedSettings(
            data="sklearn:digits",
            backbone=BackboneConfig(name=DIGITS_BACKBONE, image_size=DIGITS_IMAGE_SIZE),
            extract=ExtractConfig(batch_size=128),
        )
    )
    return FeatureSet.from_store(open_store(summary.store), device=device)


def partial_config(s: SuiteSettings) -> PartialConfig:
    """The partially frozen regime's settings; quick mode: one trainable block, 4 shots and all
    rows, 3 seeds."""
    cfg = PartialConfig(device=s.device)
    if s.quick:
        cfg = replace(cfg, blocks=(1,), shots=(4, None), seeds=(0, 1, 2))
    return _with_options(cfg, s)


def run_partial_suite(s: SuiteSettings, out_dir: str | Path) -> dict[str, Any]:
    """The partially frozen regime on the digits cache and ``s.stores``; the same report."""
    from stores import open_store

    cfg = partial_config(s)
    stores = {url: open_store(url) for url in s.stores}
    for store in stores.values():
        cache_point(store)  # an activation cache, else the one-line fix
        check_seeds_fit(store, cfg.shots)
    if s.builtin:
        d = DIGITS_CACHE
        name = f"digits ({d['backbone']} random init, {d['image_size']}px, cache block:-{d['cache_at']})"
        stores = {name: digits_cache(s.device), **stores}
    t0 = time.perf_counter()
    records: list[Record] = []
    for name, store in stores.items():
        logger.info("quality, partially frozen: %s", name)
        records += run_partial(store, cfg, dataset=name)
    rows = summarize(records)
    meta = {
        "regime": "partially frozen (pipeline.evaluation.partial)",
        "methods": list(cfg.methods),
        "method_settings": {m: repr(METHODS[m][1]) for m in cfg.methods},
        "blocks": list(cfg.blocks),
        "shots": ["all" if k is None else k for k in cfg.shots],
        "seeds": list(cfg.seeds),
        "config": repr(cfg),
        "quick": s.quick,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_quality_report(records, rows, out_dir, meta=meta)
    return {"summary": rows, "markdown": markdown(rows), "meta": meta}


def run_suite(s: SuiteSettings, out_dir: str | Path) -> dict[str, Any]:
    """Run the protocol on every data set; write JSON, markdown and plots to ``out_dir``."""
    from stores import open_store

    if s.partial:
        return run_partial_suite(s, out_dir)
    cfg = quality_config(s)
    datasets = builtin_datasets(s) if s.builtin else {}
    for url in s.stores:
        datasets[url] = FeatureSet.from_store(open_store(url), device=s.device)
    t0 = time.perf_counter()
    records: list[Record] = []
    # every step here is a tiny matmul: one thread on a CPU (see pipeline.threads)
    with torch_threads(1 if s.device == "cpu" else None):
        for name, features in datasets.items():
            logger.info("quality: %s", name)
            records += run_quality(features, cfg, dataset=name)
    rows = summarize(records)
    meta = {
        "methods": list(cfg.methods),
        "method_settings": {m: repr(METHODS[m][1]) for m in cfg.methods},
        "shots": ["all" if k is None else k for k in cfg.shots],
        "seeds": list(cfg.seeds),
        "grid": {"lrs": list(cfg.lrs), "weight_decays": list(cfg.weight_decays)},
        "train": repr(cfg.train),
        "quick": s.quick,
        "seconds": round(time.perf_counter() - t0, 1),
        "synthetic": {k: repr(v) for k, v in SYNTHETIC.items() if k in datasets},
    }
    write_quality_report(records, rows, out_dir, meta=meta)
    return {"summary": rows, "markdown": markdown(rows), "meta": meta}
