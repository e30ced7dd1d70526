"""Prefect flow ``finetune``: end-to-end fine-tuning (`pipeline.finetune`), one task per epoch,
then the test score of the best weights and, optionally, a new store embedded with them."""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_image_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.finetune.loop import CURVES_FILE, Finetuner
from pipeline.finetune.settings import FinetuneSettings


@task(name="finetune-prepare", cache_policy=NO_CACHE)
def prepare_task(settings: FinetuneSettings, out: str, resume: bool) -> Finetuner:
    """Build the run (warm start) or restore it from ``out/checkpoint.pt``."""
    return Finetuner(settings, out, resume=resume)


@task(name="finetune-epoch", cache_policy=NO_CACHE)
def epoch_task(tuner: Finetuner) -> dict[str, Any]:
    """One epoch: train, validate, export the best weights, checkpoint."""
    return tuner.run_epoch()


@task(name="finetune-finish", cache_policy=NO_CACHE)
def finish_task(tuner: Finetuner) -> dict[str, Any]:
    return tuner.finish()


_COLUMNS = ("epoch", "train_loss", "train_top1", "val_top1", "violation_rate", "images_per_s")


@flow(name="finetune", log_prints=False, validate_parameters=False)
def finetune_flow(
    settings: FinetuneSettings,
    out: str,
    resume: bool = False,
    reembed_root: str | None = None,
) -> dict[str, Any]:
    """Fine-tune to ``settings.epochs`` (continuing a checkpoint with ``resume``); with
    ``reembed_root``, embed DATA again with the exported backbone into a store there. The
    summary (``store``: the new store's summary, when re-embedded)."""
    tuner = prepare_task(settings, out, resume)
    while not tuner.done:
        epoch_task(tuner)
    summary = finish_task(tuner)
    rows = [{k: _round(h.get(k)) for k in _COLUMNS} for h in summary["history"]]
    create_table_artifact(key="finetune-epochs", table=rows, description=f"carrot finetune {out}")
    from flows.train import png_data_url

    create_image_artifact(
        image_url=png_data_url(str(tuner.out / CURVES_FILE)), key="finetune-curves"
    )
    if reembed_root is not None:
        summary["store"] = reembed(settings, summary["files"]["backbone"], reembed_root)
    return summary


def reembed(settings: FinetuneSettings, backbone_file: str, root: str) -> dict[str, Any]:
    """Stage 1 again, with the fine-tuned backbone ``backbone_file`` (same DATA, splits, input
    size); the embed summary."""
    from flows.embed import embed_flow
    from pipeline.embed.run import EmbedSettings

    backbone = dataclasses.replace(settings.backbone, checkpoint=backbone_file, pretrained=False)
    return embed_flow(
        EmbedSettings(
            data=settings.data,
            backbone=backbone,
            root=root,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
        )
    )


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v
