"""Stage 1 as a library: plan an embedding store, extract the pending chunks, finalize.

Callable without Prefect (benchmarks, Dask workers, notebooks); ``flows.embed`` wires the same
steps into a Prefect flow. Resumable: only chunks whose progress flag is unset are computed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch

from pipeline.embed.backbone import (
    Backbone,
    BackboneConfig,
    check_weights,
    create_backbone,
    describe_backbone,
    embedding_dim,
    row_shape,
)
from pipeline.embed.extract import ExtractConfig, extract_rows
from pipeline.embed.sources import ImageSource, check_fingerprint_mode, resolve_source
from pipeline.errors import InputError
from pipeline.home import carrot_home
from stores import StoreIdentity, StoreWriter, open_writer, store_url
from stores.location import is_url, write_denied
from stores.schema import DEFAULT_CHUNK_ROWS

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
"""Called with the number of images just finished."""

Distribute = Callable[
    ["StoreWriter", ImageSource, list[int], "EmbedSettings", ProgressFn | None], int
]
"""Writes the pending chunks elsewhere (``pipeline.embed.parallel`` units on workers) and
returns the number of images computed; the coordinator holds the lock and finalizes."""


def default_root() -> str:
    """``$CARROT_HOME/stores``."""
    return str(carrot_home() / "stores")


@dataclass(frozen=True)
class EmbedSettings:
    """Everything stage 1 needs; resolved once at the edge (CLI or flow) and passed down."""

    data: str  # DATA argument: folder, CUB/NABirds root, CSV manifest or "sklearn:digits"
    backbone: BackboneConfig  # timm model and its weights
    extract: ExtractConfig = field(default_factory=ExtractConfig)  # batch size, views, strict
    root: str = field(default_factory=default_root)  # local folder or fsspec URL
    dtype: str = "float16"  # stored feature dtype: "float16" | "float32"
    chunk_rows: int = DEFAULT_CHUNK_ROWS  # rows per Zarr chunk = unit of work, resume and retry
    val_fraction: float = 0.1  # split made when the source gives none
    test_fraction: float = 0.2
    split_seed: int = 0
    compressor: str | None = None  # features compressor (None: fastest reads)
    storage_options: dict[str, Any] | None = None  # fsspec options for the root
    fingerprint: str = "stat"  # how the key sees files: "stat" (size, mtime) | "content" (bytes)
    allow_outside_paths: bool = False  # manifest paths may lead out of the manifest's folder
    wait_s: float = 0.0  # wait this long for another live writer of the store (0: refuse)

    def __post_init__(self) -> None:
        check_fingerprint_mode(self.fingerprint)


@dataclass(frozen=True)
class EmbedPlan:
    """A resolved source and the identity (so the URL) of the store it maps to."""

    source: ImageSource
    identity: StoreIdentity
    url: str


@dataclass
class EmbedSummary:
    """What ``carrot embed --json`` prints."""

    store: str  # store path or URL
    n: int  # images listed (skipped included)
    dim: int  # embedding width D
    skipped: list[str]  # source-relative ids of unreadable images
    cache_hit: bool  # True: a complete store with this key existed; no backbone work done
    seconds: float  # wall time of the whole stage
    images_per_second: float  # over the images computed in this run (0 on a cache hit)
    key: str  # content key (sha256 hex)
    dataset: str
    backbone: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_settings_source(settings: EmbedSettings) -> ImageSource:
    """Resolve DATA into an :class:`ImageSource` (splits made when the source has none).

    Raises:
        InputError: bad DATA, or a single class: a store of one class trains no classifier
            (``carrot train`` would fail only after the whole embedding run).
    """
    source = resolve_source(
        settings.data,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        seed=settings.split_seed,
        allow_outside_paths=settings.allow_outside_paths,
    )
    if len(source.class_names) < 2:
        fix = {
            "csv": "give rows of at least 2 labels",
            "folder": "add a sub-folder per class",
        }.get(source.kind, "check its class files")
        raise InputError(
            f"DATA {settings.data!r} has one class {source.class_names[0]!r}; a classifier needs "
            f"at least 2: {fix}"
        )
    return source


def check_settings(settings: EmbedSettings) -> EmbedPlan:
    """Fail fast on bad input before any work (and before a Prefect server starts): DATA, the
    model name, the weights (a checkpoint is read and fitted to a meta-device model: unreadable,
    pickled code, NaN/Inf, misfit; hub weights must be cached or downloadable), the device.

    Cheap for a random init: no weights are loaded and the backbone is built on the meta device.
    """
    check_root(settings.root)
    check_weights(settings.backbone)
    if settings.backbone.cache_at:  # the cache point, before the data (whose splits may warn)
        row_shape(settings.backbone)
    return plan_embedding(settings, resolve_settings_source(settings))


def check_root(root: str) -> None:
    """`InputError` naming ``--root`` when a local store root cannot hold stores: it (or a
    folder on its way) is a file, or the nearest existing folder is not writable."""
    if is_url(root):
        return  # fsspec roots are checked by writing
    path = os.path.abspath(os.path.expanduser(root))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise InputError(
            f"--root {root}: {probe} is a file, not a folder; give a folder for the stores"
        )
    e = write_denied(probe)  # without creating the folders on the way
    if e is not None:
        raise InputError(
            f"--root {root}: cannot write in {probe} ({e.strerror or e}); give a writable "
            "folder (or set CARROT_HOME)"
        )


def plan_embedding(settings: EmbedSettings, source: ImageSource) -> EmbedPlan:
    """Compute the store identity and URL without loading weights or running the backbone.

    ``identity.extra`` holds the view seed and precision, plus — only where used, so the keys
    of default runs stay as they were — ``fingerprint: "content"``, ``features`` (a token mode
    of `pipeline.embed.feature_modes`) and, for a manifest with allowed outside paths,
    ``id_root`` (the folder the ids are relative to).
    """
    data_config, weights, precision = describe_backbone(settings.backbone)
    extra: dict[str, Any] = {"view_seed": settings.extract.view_seed, "precision": precision}
    if settings.fingerprint != "stat":
        extra["fingerprint"] = settings.fingerprint
    if settings.backbone.features != "pooled":
        extra["features"] = settings.backbone.features
    if settings.backbone.cache_at:
        extra["cache_at"] = f"block:-{settings.backbone.cache_at}"
        shape = list(row_shape(settings.backbone))  # of each flattened row
        extra["tokens" if len(shape) == 2 else "feature_map"] = shape  # (T, D) or (C, H, W)
    if source.outside_paths:
        extra["id_root"] = source.root
    identity = StoreIdentity(
        dataset=source.name,
        backbone=settings.backbone.name,
        weights=weights,
        data_config=data_config,
        views=settings.extract.views,
        dtype=settings.dtype,
        versions={"timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
        input_fingerprint=source.fingerprint(settings.fingerprint),
        extra=extra,
    )
    return EmbedPlan(source=source, identity=identity, url=store_url(settings.root, identity))


def open_plan_writer(plan: EmbedPlan, settings: EmbedSettings, dim: int) -> StoreWriter:
    """Create (or resume) the store of ``plan``; takes the store's writer lock."""
    src = plan.source
    return open_writer(
        plan.url,
        plan.identity,
        ids=[r.id for r in src.records],
        labels=[r.label for r in src.records],
        split=[r.split for r in src.records],
        class_names=list(src.class_names),
        dim=dim,
        chunk_rows=settings.chunk_rows,
        compressor=settings.compressor,
        storage_options=settings.storage_options,
        wait_s=settings.wait_s,
    )


def write_chunk(
    writer: StoreWriter,
    backbone: Backbone,
    source: ImageSource,
    chunk: int,
    settings: EmbedSettings,
) -> int:
    """Extract and write one chunk (chunk-aligned, idempotent). Returns its number of images."""
    rows = writer.chunk_rows_range(chunk)
    result = extract_rows(backbone, source, rows, settings.extract)
    writer.write_chunk(chunk, result.features, valid=result.valid, errors=result.errors)
    return len(rows)


def summarize(
    plan: EmbedPlan,
    settings: EmbedSettings,
    *,
    cache_hit: bool,
    seconds: float,
    rate: float,
) -> EmbedSummary:
    """Summary of a finished (complete) store."""
    from stores import open_store

    store = open_store(plan.url, storage_options=settings.storage_options)
    skipped = [s["id"] for s in store.attrs.get("skipped", [])]
    return EmbedSummary(
        store=plan.url,
        n=store.n,
        dim=store.dim,
        skipped=skipped,
        cache_hit=cache_hit,
        seconds=round(seconds, 3),
        images_per_second=round(rate, 2),
        key=plan.identity.key(),
        dataset=plan.identity.dataset,
        backbone=plan.identity.backbone,
    )


@dataclass(frozen=True)
class EmbedSteps:
    """The steps of stage 1, swappable so a Prefect flow can run each one as a task.

    The defaults are the plain library functions; ``flows.embed`` passes task-wrapped ones.
    """

    resolve: Callable[[EmbedSettings], ImageSource] = resolve_settings_source
    plan: Callable[[EmbedSettings, ImageSource], EmbedPlan] = plan_embedding
    build_backbone: Callable[[EmbedSettings], Backbone] = lambda s: create_backbone(s.backbone)
    write_chunk: Callable[[StoreWriter, Backbone, ImageSource, int, EmbedSettings], int] = (
        write_chunk
    )
    finalize: Callable[[StoreWriter, dict], None] = lambda w, timings: w.finalize(timings=timings)


def run_embedding(
    settings: EmbedSettings,
    *,
    progress: ProgressFn | None = None,
    on_start: ProgressFn | None = None,
    steps: EmbedSteps | None = None,
    distribute: Distribute | None = None,
) -> EmbedSummary:
    """Stage 1 end to end: resolve, plan, extract pending chunks, finalize.

    ``on_start(total)`` is told how many images are pending; ``progress(n)`` after each chunk.
    A cache hit (complete store with the same key) builds no backbone. With ``distribute``
    the chunks are written by workers: this process builds no backbone either (the width D
    comes from a meta-device forward), holds the lock and finalizes.
    """
    steps = steps or EmbedSteps()
    t0 = time.perf_counter()
    source = steps.resolve(settings)
    plan = steps.plan(settings, source)
    backbone: Backbone | None = None
    dim = cached_dim(plan, settings)
    if dim is None and distribute is not None:
        dim = embedding_dim(settings.backbone)
    elif dim is None:
        backbone = steps.build_backbone(settings)
        dim = backbone.dim
    with open_plan_writer(plan, settings, dim) as writer:
        cache_hit, rate = writer.complete, 0.0
        if not cache_hit:
            pending = writer.pending_chunks()
            if on_start is not None:
                on_start(sum(len(writer.chunk_rows_range(i)) for i in pending))
            t_extract = time.perf_counter()
            if distribute is not None:
                images = distribute(writer, source, pending, settings, progress)
            else:
                backbone = backbone or steps.build_backbone(settings)
                images = 0
                for i in pending:
                    done = steps.write_chunk(writer, backbone, source, i, settings)
                    images += done
                    if progress is not None:
                        progress(done)
            extract_s = time.perf_counter() - t_extract
            steps.finalize(writer, {"extract_seconds": round(extract_s, 3), "images": images})
            rate = images / extract_s if extract_s > 0 else 0.0
    return summarize(
        plan, settings, cache_hit=cache_hit, seconds=time.perf_counter() - t0, rate=rate
    )


def cached_dim(plan: EmbedPlan, settings: EmbedSettings) -> int | None:
    """Width D of an existing store at the plan's URL (so a cache hit builds no backbone).

    None when there is no store yet, or only a store whose creation was cut short (the writer
    rebuilds it).
    """
    from stores import open_store
    from stores.errors import StoreIncompleteError, StoreNotFoundError

    try:
        return open_store(
            plan.url, storage_options=settings.storage_options, require_complete=False
        ).dim
    except (StoreNotFoundError, StoreIncompleteError):
        return None
