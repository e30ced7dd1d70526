"""Prefect flow ``embed``: stage 1 as a recipe of tasks over ``pipeline.embed.run``.

resolve source → plan store (content key) → [cache hit: done] → build backbone →
extract+write each pending chunk (retried on transient I/O) → finalize → summary artifact.

With ``workers`` > 0 (the flow runs on a ``DaskTaskRunner``) the pending chunks become work
units (`pipeline.embed.parallel`), one submitted task each, written by the Dask workers; this
process holds the store's lock, refreshes its heartbeat as units finish, and finalizes.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows import progress
from pipeline.embed.backbone import Backbone, create_backbone
from pipeline.embed.parallel import WorkUnit, distributor, write_unit
from pipeline.embed.run import (
    EmbedPlan,
    EmbedSettings,
    EmbedSteps,
    EmbedSummary,
    plan_embedding,
    resolve_settings_source,
    run_embedding,
    write_chunk,
)
from pipeline.embed.sources import ImageSource
from pipeline.errors import InputError
from pipeline.terminal import printable
from stores import StoreWriter
from stores.errors import StoreInputError, write_failure

# Retry transient I/O (network filesystems, object stores), never the user's mistakes.
_TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _retry_transient(task, task_run, state) -> bool:
    """Retry condition: only transient I/O errors, not bad input or locked stores."""
    try:
        state.result()
    except (InputError, StoreInputError):
        return False
    except _TRANSIENT as e:
        return write_failure(e) is None  # a full disk or a read-only folder stays so
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
    return write_chunk(writer, backbone, source, chunk, settings)


@task(
    name="embed-unit",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retry_transient,
)
def embed_unit_task(unit: WorkUnit, settings: EmbedSettings) -> int:
    return write_unit(unit, settings)


@task(
    name="finalize-store",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_transient,
)
def finalize_task(writer: StoreWriter, timings: dict) -> None:
    writer.finalize(timings=timings)


def _md(text: object) -> str:
    """A markdown table cell: control characters escaped, ``|`` and backticks neutralized."""
    return printable(text).replace("|", "\\|").replace("`", "'")


def _summary_markdown(s: EmbedSummary) -> str:
    shown = ", ".join(_md(i) for i in s.skipped[:20]) + (" …" if len(s.skipped) > 20 else "")
    return (
        f"# Embedding store\n\n| field | value |\n|---|---|\n"
        f"| store | `{_md(s.store)}` |\n| data set | {_md(s.dataset)} |\n"
        f"| backbone | {_md(s.backbone)} |\n"
        f"| N | {s.n} |\n| D | {s.dim} |\n| images/s | {s.images_per_second:.1f} |\n"
        f"| skipped | {len(s.skipped)} ({shown or 'none'}) |\n| cache hit | {s.cache_hit} |\n"
        f"| seconds | {s.seconds:.2f} |\n| key | `{s.key[:16]}…` |\n"
    )


_FLOW_STEPS = EmbedSteps(
    resolve=resolve_source_task,
    plan=plan_store_task,
    build_backbone=build_backbone_task,
    write_chunk=extract_write_chunk_task,
    finalize=finalize_task,
)


@flow(name="embed", log_prints=False, validate_parameters=False)
def embed_flow(settings: EmbedSettings, workers: int = 0) -> dict:
    """Stage 1: write (or reuse) the embedding store for ``settings``. Returns the summary dict.

    ``workers`` > 0: the chunks go to the flow's (Dask) task runner, planned for that many
    worker threads."""
    summary = run_embedding(
        settings,
        progress=progress.advance,
        on_start=progress.start,
        steps=_FLOW_STEPS,
        distribute=(
            distributor(workers, embed_unit_task.submit, as_completed) if workers > 0 else None
        ),
    )
    create_markdown_artifact(
        key="embed-summary", markdown=_summary_markdown(summary), description="carrot embed"
    )
    return summary.to_dict()
