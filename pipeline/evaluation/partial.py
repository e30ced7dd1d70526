"""``carrot bench quality --partial``: does CARROT help when the augmented loss reaches trainable
blocks? The partially frozen regime, paired over seeds.

On a linear head, noise orthogonal to ``w_y − w_k`` leaves those margins unchanged; through
trainable blocks (`pipeline.heads.top`) the augmented term's gradient reaches the features
themselves. For every number of trainable blocks, regime (k shots per class, or all training
rows) and seed:

1. the training rows are drawn with the seed (k per class; all methods of a seed share them);
2. every method trains the same top — the backbone's last N blocks, final norms and a
   LayerNorm + Linear head — from the same initial weights, with the same fixed
   hyperparameters and step budget (no selection: validation rows are not used, so no method
   gets a search the others do not);
3. test top-1 and mean per-class accuracy are recorded, and the **paired** difference to the
   plain run of the same seed (`pipeline.evaluation.protocol.summarize`).

Methods are the quality protocol's (`protocol.METHODS`) that act on the head's post-LayerNorm
input: plain, CARROT (sample and class mode), isotropic Gaussian noise, ISDA, DC and mixup.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.evaluation.protocol import BASELINE, METHODS, Record
from pipeline.heads.fewshot import sample_shots
from pipeline.heads.top import TopSettings, cache_point, train_top

logger = logging.getLogger(__name__)

PARTIAL_METHODS = ("plain", "carrot-sample", "carrot-class", "gaussian", "isda", "dc", "mixup")
"""The methods this regime runs (the others inject before the LayerNorm or are not heads)."""

DIGITS_CACHE = {"backbone": "vit_tiny_patch16_224", "image_size": 64, "cache_at": 2}
"""The built-in data set: digits through a random-init small ViT, the input of its last 2
blocks cached (17 tokens × 192)."""


@dataclass(frozen=True)
class PartialConfig:
    """One partially frozen quality run over one activation cache."""

    blocks: tuple[int, ...] = (1, 2)  # trainable blocks (each ≤ the cache point)
    methods: tuple[str, ...] = PARTIAL_METHODS  # "plain" is always included (the pairing)
    shots: tuple[int | None, ...] = (4, 16, None)  # None = all training rows
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 10  # over all training rows; few-shot runs get at least `min_steps` steps
    min_steps: int = 200
    lr: float = TopSettings.lr
    weight_decay: float = TopSettings.weight_decay
    batch_size: int = TopSettings.batch_size
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in PARTIAL_METHODS]
        if unknown:
            raise InputError(
                f"--methods: {unknown} do not run in the partially frozen regime; choose from "
                f"{list(PARTIAL_METHODS)}"
            )
        if BASELINE not in self.methods:
            object.__setattr__(self, "methods", (BASELINE, *self.methods))
        if not self.seeds:
            raise InputError("give at least one seed")
        if not self.blocks or min(self.blocks) < 1:
            raise InputError(f"trainable blocks {self.blocks}: give N ≥ 1")


def epochs_for(cfg: PartialConfig, rows: int) -> int:
    """Epochs of a run on ``rows`` training rows: ``cfg.epochs``, or more where that would be
    fewer than ``cfg.min_steps`` steps."""
    per_epoch = math.ceil(rows / cfg.batch_size)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


def run_partial(store, cfg: PartialConfig, *, dataset: str) -> list[Record]:
    """Every method × trainable blocks × regime × seed over the activation cache ``store``.

    Raises:
        InputError: not an activation cache, blocks above its cache point, too few rows for
            the shots.
    """
    cached, _ = cache_point(store)
    if max(cfg.blocks) > cached:
        raise InputError(
            f"store {store.url} caches the input of its last {cached} block(s); the partially "
            f"frozen regime asked for {max(cfg.blocks)}: embed with --cache-at "
            f"block:-{max(cfg.blocks)}"
        )
    y = store.labels("train")
    records = []
    for blocks in cfg.blocks:
        name = f"{dataset}, top {blocks} block{'s' if blocks > 1 else ''} trainable"
        for shots in cfg.shots:
            for seed in cfg.seeds:
                index = None if shots is None else sample_shots(y, shots, seed=seed)
                rows = len(y) if index is None else len(index)
                settings = TopSettings(
                    blocks=blocks,
                    epochs=epochs_for(cfg, rows),
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                    batch_size=min(cfg.batch_size, rows),
                    seed=seed,
                    device=cfg.device,
                )
                for method in cfg.methods:
                    aug, aug_settings = METHODS[method]
                    result = train_top(
                        store,
                        TopSettings(**{**settings.__dict__, "aug": aug}),
                        train_index=index,
                        aug_settings=aug_settings,
                    )
                    logger.info(
                        "%s %s shots=%s seed=%d: %.4f", name, method, shots, seed, result.test_top1
                    )
                    records.append(
                        Record(
                            dataset=name,
                            method=method,
                            shots=shots,
                            seed=seed,
                            top1=float(result.test_top1),
                            mean_per_class=float(result.test_mean_per_class),
                            chosen={
                                "epochs": settings.epochs,
                                "augmented_rows": result.diagnostics["augmented_rows"],
                                "final_train_loss": result.train_loss[-1],
                                "seconds": round(result.seconds, 2),
                            },
                        )
                    )
    return records


def digits_cache(device: str = "cpu"):
    """The built-in activation cache (`DIGITS_CACHE`), embedded with stage 1 when not cached."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, run_embedding
    from stores import open_store

    backbone = BackboneConfig(
        name=DIGITS_CACHE["backbone"],
        image_size=DIGITS_CACHE["image_size"],
        cache_at=DIGITS_CACHE["cache_at"],
        device=device,
    )
    settings = EmbedSettings(
        data="sklearn:digits", backbone=backbone, extract=ExtractConfig(batch_size=128)
    )
    return open_store(run_embedding(settings).store)


def check_seeds_fit(store, shots: tuple[int | None, ...]) -> None:
    """`InputError` before any training when a class has fewer train rows than ``shots``."""
    counts = np.bincount(store.labels("train"))
    fewest = int(counts[counts > 0].min())
    too_many = [k for k in shots if k is not None and k > fewest]
    if too_many:
        raise InputError(
            f"--shots {max(too_many)}: store {store.url} has a class with {fewest} training rows"
        )
