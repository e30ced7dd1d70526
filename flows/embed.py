"""Prefect flow ``embed``: stage 1 as a recipe of tasks over ``pipeline.embed``.

resolve source → plan store (content key) → [cache hit: done] → build backbone →
extract+write each pending chunk (retried on transient I/O) → finalize → summary artifact.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import progress
from pipeline.backbone import Backbone, create_backbone
from pipeline.embed import (
    EmbedPlan,
    EmbedSettings,
    EmbedSummary,
    cached_dim,
    open_plan_writer,
    plan_embedding,
    resolve_settings_source,
    summarize,
    write_chunks,
)
from pipeline.errors import InputError
from pipeline.sources import ImageSource
from stores import StoreWriter
from stores.errors import StoreInputError

# Retry transient I/O (network filesystems, object stores), never the user's mistakes.
_TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _retry_transient(task, task_run, state) -> bool:
    """Retry condition: only transient I/O errors, not bad input or locked stores."""
    try:
        state.result()
    except (InputError, StoreInputError):
        return False
    except _TRANSIENT:
        return True
    except Exception:
        return False
    return False


@task(
    name="resolve-source",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_transient,
)
def resolve_source_task(settings: EmbedSettings) -> ImageSource:
    return resolve_settings_source(settings)


@task(name="plan-store", cache_policy=NO_CACHE)
def plan_store_task(settings: EmbedSettings, source: ImageSource) -> EmbedPlan:
    return plan_embedding(settings, source)


@task(name="build-backbone", cache_policy=NO_CACHE)
def build_backbone_task(settings: EmbedSettings) -> Backbone:
    return create_backbone(settings.backbone)


@task(
    name="extract-write-chunk",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_transient,
)
def extract_write_chunk_task(
    writer: StoreWriter,
    backbone: Backbone,
    source: ImageSource,
    chunk: int,
    settings: EmbedSettings,
) -> int:
    images, _ = write_chunks(writer, backbone, source, [chunk], settings, progress=progress.advance)
    return images


@task(
    name="finalize-store",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_transient,
)
def finalize_task(writer: StoreWriter, timings: dict) -> None:
    writer.finalize(timings=timings)


def _summary_markdown(s: EmbedSummary) -> str:
    skipped = ", ".join(s.skipped[:20]) + (" …" if len(s.skipped) > 20 else "") or "none"
    return (
        f"# Embedding store\n\n| field | value |\n|---|---|\n"
        f"| store | `{s.store}` |\n| data set | {s.dataset} |\n| backbone | {s.backbone} |\n"
        f"| N | {s.n} |\n| D | {s.dim} |\n| images/s | {s.images_per_second:.1f} |\n"
        f"| skipped | {len(s.skipped)} ({skipped}) |\n| cache hit | {s.cache_hit} |\n"
        f"| seconds | {s.seconds:.2f} |\n| key | `{s.key[:16]}…` |\n"
    )


@flow(name="embed", log_prints=False, validate_parameters=False)
def embed_flow(settings: EmbedSettings) -> dict:
    """Stage 1: write (or reuse) the embedding store for ``settings``. Returns the summary dict."""
    t0 = time.perf_counter()
    source = resolve_source_task(settings)
    plan = plan_store_task(settings, source)
    backbone = None
    dim = cached_dim(plan, settings)
    if dim is None:
        backbone = build_backbone_task(settings)
        dim = backbone.dim
    with open_plan_writer(plan, settings, dim) as writer:
        cache_hit = writer.complete
        rate = 0.0
        if not cache_hit:
            if backbone is None:
                backbone = build_backbone_task(settings)
            pending = writer.pending_chunks()
            progress.start(sum(len(writer.chunk_rows_range(i)) for i in pending))
            t_extract = time.perf_counter()
            images = sum(
                extract_write_chunk_task(writer, backbone, source, i, settings) for i in pending
            )
            extract_s = time.perf_counter() - t_extract
            finalize_task(writer, {"extract_seconds": round(extract_s, 3), "images": images})
            rate = images / extract_s if extract_s > 0 else 0.0
    summary = summarize(
        plan, settings, cache_hit=cache_hit, seconds=time.perf_counter() - t0, rate=rate
    )
    create_markdown_artifact(
        key="embed-summary", markdown=_summary_markdown(summary), description="carrot embed"
    )
    return summary.to_dict()
