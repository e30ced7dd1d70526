"""Stage 1 across processes: chunk-aligned work units of one preallocated store.

The coordinator (``run_embedding`` with a ``distribute`` function, e.g. the Prefect flow on a
Dask cluster) holds the store's lock and preallocates it; each unit is a run of consecutive
pending chunks with only the records of its rows (a slice of the source, so a unit pickles
small). A worker writes whole chunks only — disjoint, chunk-aligned writes never lose rows
(unaligned concurrent writes do) — and flags each one in the progress record, so a lost worker
costs only its unflagged chunks: the unit is rerun elsewhere, or by the next ``carrot embed``.

No Prefect here, and Dask only when asked: a unit runs in any process (`write_unit`);
`run_units` gathers submitted units (Prefect task futures in ``flows.embed``, Dask futures in
`dask_distribute`, the path for notebooks and benchmarks).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.embed.backbone import Backbone, BackboneConfig
    from pipeline.embed.run import Distribute, EmbedSettings, ProgressFn
    from pipeline.embed.sources import ImageSource
    from stores import StoreWriter

UNITS_PER_WORKER = 4
"""Work units per worker thread: enough to balance uneven workers and to bound what a lost
worker costs, few enough that per-task overhead (about 0.1 s each) stays small."""


@dataclass(frozen=True)
class WorkUnit:
    """Consecutive chunks ``chunks`` of store ``url``; ``source`` holds only the records of
    rows ``first_row ..`` (the unit's rows)."""

    url: str
    storage_options: dict[str, Any] | None
    chunks: tuple[int, ...]
    first_row: int
    source: ImageSource

    @property
    def rows(self) -> int:
        return len(self.source.records)


def split_pending(pending: Sequence[int], parts: int) -> list[list[int]]:
    """Pending chunk numbers as runs of consecutive chunks, at most ``ceil(len / parts)`` long.

    Ascending input; each run is a contiguous block of chunks (so of rows). ``parts`` ≥ 1.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if not pending:
        return []
    size = math.ceil(len(pending) / parts)
    runs: list[list[int]] = [[pending[0]]]
    for i in pending[1:]:
        if i == runs[-1][-1] + 1 and len(runs[-1]) < size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def plan_units(
    url: str,
    source: ImageSource,
    pending: Sequence[int],
    *,
    chunk_rows: int,
    workers: int,
    storage_options: dict[str, Any] | None = None,
) -> list[WorkUnit]:
    """The work units for ``pending`` chunks over ``workers`` worker threads."""
    units = []
    n = len(source.records)
    for run in split_pending(pending, max(1, workers) * UNITS_PER_WORKER):
        first, stop = run[0] * chunk_rows, min((run[-1] + 1) * chunk_rows, n)
        part = dataclasses.replace(source, records=source.records[first:stop])
        units.append(WorkUnit(url, storage_options, tuple(run), first, part))
    return units


def write_unit(unit: WorkUnit, settings: EmbedSettings) -> int:
    """Extract and write the unit's chunks that are still pending (a rerun of a unit skips
    what a lost worker already flagged). Returns the number of images computed."""
    from pipeline.embed.extract import extract_rows
    from stores import StoreWriter

    writer = StoreWriter.open_for_chunks(unit.url, storage_options=unit.storage_options)
    todo = set(writer.pending_chunks()) & set(unit.chunks)
    if not todo:
        return 0
    backbone = worker_backbone(settings.backbone)
    images = 0
    for i in sorted(todo):
        rows = writer.chunk_rows_range(i)
        local = range(rows.start - unit.first_row, rows.stop - unit.first_row)
        result = extract_rows(
            backbone, unit.source, local, settings.extract, row_offset=unit.first_row
        )
        writer.write_chunk(i, result.features, valid=result.valid, errors=result.errors)
        images += len(rows)
    return images


def run_units(
    writer: StoreWriter,
    units: Sequence[WorkUnit],
    submit: Callable[[WorkUnit], Any],
    as_completed: Callable[[list[Any]], Iterable[Any]],
    advance: ProgressFn | None = None,
) -> int:
    """Submit every unit, then collect them as they finish: the lock's heartbeat refreshed and
    ``advance(rows)`` told after each. A failed unit does not stop the others (what they write
    is kept for the rerun); the first error is raised once all are done. Returns the images
    computed. ``submit(unit)`` returns a future with ``.result()``; ``as_completed`` is the
    executor's own (Prefect's or Dask's)."""
    futures = {submit(u): u for u in units}
    images, first_error = 0, None
    for future in as_completed(list(futures)):
        writer.heartbeat()
        try:
            images += future.result()
        except Exception as e:  # wait for the other units
            first_error = first_error or e
            continue
        if advance is not None:
            advance(futures[future].rows)
    if first_error is not None:
        raise first_error
    return images


def distributor(
    workers: int,
    submit: Callable[[WorkUnit, EmbedSettings], Any],
    as_completed: Callable[[list[Any]], Iterable[Any]],
) -> Distribute:
    """``run_embedding``'s ``distribute``: the pending chunks as `plan_units` for ``workers``
    worker threads, each sent with ``submit(unit, settings)`` and gathered by `run_units`."""

    def distribute(
        writer: StoreWriter,
        source: ImageSource,
        pending: list[int],
        settings: EmbedSettings,
        advance: ProgressFn | None,
    ) -> int:
        units = plan_units(
            writer.url,
            source,
            pending,
            chunk_rows=writer.chunk_rows,
            workers=workers,
            storage_options=settings.storage_options,
        )
        return run_units(writer, units, lambda u: submit(u, settings), as_completed, advance)

    return distribute


def dask_distribute(client: Any, workers: int) -> Distribute:
    """`distributor` on a ``distributed.Client`` without Prefect: one Dask task per unit."""
    from distributed import as_completed

    return distributor(
        workers, lambda u, s: client.submit(write_unit, u, s, pure=False), as_completed
    )


_BACKBONES: dict[BackboneConfig, Backbone] = {}
_BACKBONES_LOCK = threading.Lock()


def worker_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone of ``cfg``, built once per process and reused by its later units (only the
    latest config is kept, so a sweep's workers hold one model at a time)."""
    from pipeline.embed.backbone import create_backbone

    with _BACKBONES_LOCK:
        if cfg not in _BACKBONES:
            _BACKBONES.clear()
            _BACKBONES[cfg] = create_backbone(cfg)
        return _BACKBONES[cfg]
