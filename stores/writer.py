"""Writing a store: preallocate, write whole chunks (resumable, idempotent), finalize.

``open_writer`` creates the store at full shape, resumes an interrupted one, or returns a writer
whose ``complete`` is True for a finished store with the same key (cache hit: no work). Chunks are
written whole, then flagged in ``progress``; a process killed at any moment leaves unflagged
chunks that the next run rewrites, so the finished store equals an uninterrupted run's.

Several processes (e.g. Dask workers) may write disjoint chunks of one store: the coordinator
holds the lock (``open_writer``), workers call ``StoreWriter.open_for_chunks(url)`` (no lock) and
``write_chunk``; the coordinator then calls ``finalize``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.errors import (
    StoreError,
    StoreIncompleteError,
    StoreInputError,
    StoreLockedError,
    StoreNotFoundError,
    corrupt_error,
    storage_errors,
)
from stores.identity import StoreIdentity, jsonable
from stores.integrity import REBUILT_BY_WRITER, inspect_store
from stores.location import StoreLocation, open_group, resolve
from stores.lock import DEFAULT_TTL_S, StoreLock
from stores.schema import (
    DEFAULT_CHUNK_ROWS,
    ROW_ARRAYS,
    check_rows,
    chunk_range,
    compressor_codecs,
    create_arrays,
    feature_shape,
    initial_attrs,
    row_array,
)
from stores.verify import collect_problems, name_ids

if TYPE_CHECKING:
    import zarr

logger = logging.getLogger(__name__)

RESUMES = "the store resumes from its last whole chunk"
"""What running ``carrot embed`` again does after a write failed (disk full, read-only)."""
WAIT_POLL_S = 2.0
"""Seconds between two tries for a store's lock while waiting for another writer."""


class StoreWriter:
    """Writes whole chunks of one preallocated store. Get one from :func:`open_writer` or
    :meth:`open_for_chunks`. A context manager: exit releases the lock, never marks complete.

    Attributes: ``url``, ``identity``, ``key``, ``n`` rows, ``dim``, ``views``, ``dtype``,
    ``chunk_rows``, ``n_chunks``, ``complete`` (True: finished, nothing left to write).
    """

    def __init__(
        self,
        location: StoreLocation,
        group: zarr.Group,
        *,
        lock: StoreLock | None,
        can_finalize: bool,
    ) -> None:
        attrs = group.attrs.asdict()
        self.url: str = location.url
        self.identity = StoreIdentity.from_dict(attrs["identity"])
        self.key: str = attrs["key"]
        self.n: int = attrs["n"]
        self.dim: int = attrs["dim"]
        self.views: int = attrs["views"]
        self.dtype = np.dtype(attrs["dtype"])
        self.chunk_rows: int = attrs["chunk_rows"]
        self.n_chunks: int = attrs["n_chunks"]
        self.complete: bool = attrs["complete"] is True
        self._location = location
        self._group = group
        self._lock = lock
        self._can_finalize = can_finalize
        self._arrays = {name: row_array(group, name) for name in ROW_ARRAYS}
        self._arrays["progress"] = group["progress"]  # False is never stored: no file = unset

    # -- opening by URL (e.g. on a Dask worker) -----------------------------------------------
    @classmethod
    def open_for_chunks(cls, url: str, *, storage_options: dict | None = None) -> StoreWriter:
        """Writer for chunks of an existing, preallocated store, WITHOUT taking the lock.

        For workers of a coordinator that holds the lock (via :func:`open_writer`) and finalizes.
        Workers must write disjoint chunks; this writer cannot finalize.
        """
        location = resolve(url, storage_options)
        if not location.exists():
            raise StoreNotFoundError(
                f"no store at {url!r}; the coordinator must open_writer it first"
            )
        group = open_group(location, mode="a")
        if group.attrs.get("initialized") is not True:
            raise StoreIncompleteError(
                f"store {url} is not preallocated yet; call open_writer(...) before open_for_chunks"
            )
        return cls(location, group, lock=None, can_finalize=False)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles as a chunk writer re-opened by URL (no lock travels to the other process)."""
        return (_reopen_for_chunks, (self.url, dict(self._location.storage_options)))

    def __copy__(self) -> StoreWriter:
        return self  # a handle on an external store and lock: copies share them

    def __deepcopy__(self, memo: dict) -> StoreWriter:
        return self

    # -- chunks -------------------------------------------------------------------------------
    def chunk_rows_range(self, i: int) -> range:
        """Rows of chunk ``i``."""
        if not 0 <= i < self.n_chunks:
            raise StoreInputError(
                f"chunk index {i} out of range 0..{self.n_chunks - 1} for {self.url}"
            )
        return chunk_range(i, n=self.n, chunk_rows=self.chunk_rows)

    def pending_chunks(self) -> list[int]:
        """Chunks whose progress flag is not set, ascending."""
        if self.complete:
            return []
        return np.flatnonzero(~self._arrays["progress"][:].astype(bool)).tolist()

    def _ids(self, rows: range) -> np.ndarray:
        return self._arrays["ids"][rows.start : rows.stop]

    def _prepare(
        self, rows: range, features: np.ndarray, valid: np.ndarray, errors: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validated, cast and zeroed arrays for one chunk, or an error naming the bad ids."""
        m = len(rows)
        expected = (m, *feature_shape(self.n, dim=self.dim, views=self.views)[1:])
        feats = np.asarray(features)
        if feats.shape != expected or feats.dtype.kind != "f":
            raise StoreInputError(
                f"chunk features must be a float array of shape {expected}, got {feats.dtype} "
                f"{feats.shape} (store {self.url}, rows {rows.start}..{rows.stop - 1})"
            )
        valid_arr = np.asarray(valid)
        if valid_arr.shape != (m,) or valid_arr.dtype != bool:
            raise StoreInputError(
                f"valid must be a bool array of shape ({m},), got {valid_arr.dtype} {valid_arr.shape}"
            )
        if len(errors) != m:
            raise StoreInputError(f"errors must hold {m} strings, got {len(errors)}")
        finite = np.isfinite(feats).reshape(m, -1).all(axis=1)
        bad = valid_arr & ~finite
        if bad.any():
            raise StoreError(
                f"non-finite features (NaN/Inf) in {int(bad.sum())} valid rows of store {self.url}: "
                f"ids {name_ids(self._ids(rows)[bad])}; nothing of this chunk was written. Mark those "
                f"rows invalid (valid=False with a reason) or fix the model/inputs."
            )
        with np.errstate(over="ignore"):  # overflow is checked just below
            out = feats.astype(self.dtype, copy=False)
        overflow = valid_arr & ~np.isfinite(out).reshape(m, -1).all(axis=1)
        if overflow.any():
            raise StoreError(
                f"features overflow {self.dtype} (|x| > {np.finfo(self.dtype).max}) in valid rows of "
                f"store {self.url}: ids {name_ids(self._ids(rows)[overflow])}; use dtype float32"
            )
        if not valid_arr.all():
            out = out.copy() if out is feats else out
            out[~valid_arr] = 0
        return out, valid_arr, np.asarray([str(e) for e in errors], dtype=str)

    def write_chunk(
        self, i: int, features: np.ndarray, *, valid: np.ndarray, errors: Sequence[str]
    ) -> None:
        """Write chunk ``i`` whole, then set its progress flag. Idempotent.

        ``features`` (rows_in_chunk, D) or (rows_in_chunk, 1+V, D), any float dtype (cast to the
        store dtype); ``valid`` (rows_in_chunk,) bool, rows with False stored as zeros; ``errors``
        one reason per row ("" when fine). Raises StoreError naming the ids of valid rows that are
        not finite (nothing written then).
        """
        if self.complete:
            raise StoreError(f"store {self.url} is complete; it is never rewritten")
        rows = self.chunk_rows_range(i)
        feats, valid_arr, errors_arr = self._prepare(rows, features, valid, errors)
        with storage_errors(f"store {self.url}", then=RESUMES):
            if self._lock is not None:
                self._lock.refresh()  # still ours? and a fresh heartbeat
            sl = slice(rows.start, rows.stop)
            self._arrays["features"][sl] = feats
            self._arrays["valid"][sl] = valid_arr
            self._arrays["errors"][sl] = errors_arr
            self._arrays["progress"][i] = True  # only after all of the chunk's rows

    def heartbeat(self) -> None:
        """Refresh the lock's heartbeat (and check it is still ours); for a coordinator whose
        workers write the chunks. A no-op for a chunk writer (no lock)."""
        if self._lock is not None:
            self._lock.refresh()

    # -- finishing ----------------------------------------------------------------------------
    def finalize(self, *, timings: dict[str, Any]) -> None:
        """Check every chunk and the whole store, record ``skipped`` and ``timings``, then set
        ``complete`` (last). Raises StoreError (store left incomplete) if anything is wrong."""
        if self.complete:
            return
        if not self._can_finalize:
            raise StoreError(
                f"this writer of {self.url} was opened with open_for_chunks; the coordinator that "
                f"holds the lock (open_writer) finalizes the store"
            )
        pending = self.pending_chunks()
        if pending:
            raise StoreIncompleteError(
                f"cannot finalize {self.url}: {len(pending)} chunks not written yet "
                f"({pending[:10]}); re-run `carrot embed` to write them (library callers: write "
                f"pending_chunks(), then finalize again)"
            )
        if self._lock is not None:
            self._lock.refresh()
        problems, _ = collect_problems(self._group, self._location, require_complete=False)
        if problems:
            raise StoreError(
                f"store {self.url} failed its checks, not marked complete: " + "; ".join(problems)
            )
        ids = self._arrays["ids"][:]
        valid = self._arrays["valid"][:].astype(bool)
        errors = self._arrays["errors"][:]
        skipped = [
            {"id": str(ids[r]), "reason": str(errors[r]) or "skipped"}
            for r in np.flatnonzero(~valid)
        ]
        with storage_errors(f"store {self.url}", then=RESUMES):
            self._group.attrs.update({"skipped": skipped, "timings": jsonable(dict(timings))})
            self._group.attrs["complete"] = True  # written last
        self.complete = True
        logger.info(
            "store %s complete: %d rows (%d skipped), %d chunks",
            self.url,
            self.n,
            len(skipped),
            self.n_chunks,
        )

    def close(self) -> None:
        """Release the lock (if held). Never marks the store complete."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.n_chunks} chunks"
        return f"StoreWriter({self.url!r}, n={self.n}, dim={self.dim}, {state})"


def _reopen_for_chunks(url: str, storage_options: dict) -> StoreWriter:
    return StoreWriter.open_for_chunks(url, storage_options=storage_options)


def _check_same_store(
    group: zarr.Group,
    url: str,
    key: str,
    *,
    dim: int,
    class_names: Sequence[str],
    ids: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
    rows: bool = True,
) -> None:
    """StoreInputError unless the store at ``url`` was made for exactly these inputs (with
    ``rows=False``, from its attributes only)."""
    attrs = group.attrs.asdict()
    fix = (
        "delete the store folder and re-run `carrot embed` to rebuild it (library callers: "
        "write to store_url(root, identity))"
    )
    if attrs.get("key") != key:
        raise StoreInputError(
            f"store {url} holds content key {str(attrs.get('key'))[:12]}…, but this identity gives "
            f"{key[:12]}…; {fix}"
        )
    if attrs["dim"] != dim or attrs["class_names"] != list(class_names) or attrs["n"] != len(ids):
        raise StoreInputError(
            f"store {url} has n={attrs['n']}, dim={attrs['dim']}, class_names={attrs['class_names'][:5]}…; "
            f"asked for n={len(ids)}, dim={dim}, class_names={list(class_names)[:5]}…; {fix}"
        )
    if not rows:
        return
    for name, given in (("ids", ids), ("labels", labels), ("split", split)):
        stored = group[name][:]
        if stored.shape != given.shape or not np.array_equal(stored, given):
            raise StoreInputError(
                f"store {url} was written for other {name} under the same key (the identity's "
                f"input_fingerprint must cover ids, labels and split); {fix}"
            )


def _repair_lost_chunks(
    group: zarr.Group, location: StoreLocation, damaged: dict[str, list[int]], rows: dict
) -> None:
    """Make a store whose chunk files were lost resumable, keeping every sound chunk.

    ``damaged``: array → chunks marked written whose file is missing or of the wrong size;
    ``rows``: the writer's ``ids``/``labels``/``split`` (same key, so the same values). The store
    is marked incomplete first, lost ids/labels/split rows are rewritten from ``rows``, and the
    progress flags of chunks that lost features/valid/errors files are unset (written again).
    """
    logger.warning(
        "store %s lost chunk files (%s); marking it incomplete and rewriting them",
        location.url,
        ", ".join(f"{name} chunks {chunks[:10]}" for name, chunks in damaged.items()),
    )
    group.attrs["complete"] = False  # first: a crash during the repair leaves it incomplete
    chunk_rows = group.attrs["chunk_rows"]
    rewrite: set[int] = set()
    for name, chunks in damaged.items():
        if name not in REBUILT_BY_WRITER:
            rewrite.update(chunks)
            continue
        array = row_array(group, name)
        for c in chunks:
            sl = slice(c * chunk_rows, (c + 1) * chunk_rows)
            array[sl] = rows[name][sl]
    progress = group["progress"]
    for c in sorted(rewrite):
        progress[c] = False


def _open_for_resume(
    group: zarr.Group, location: StoreLocation, key: str, same: dict[str, Any]
) -> None:
    """Check that an initialized store is sound and made for these inputs; repair lost chunks.

    Raises StoreCorruptError (delete and rebuild) when its metadata is broken, StoreInputError
    when it was made for other inputs.
    """
    inspection = inspect_store(group, location, chunks=True)
    if inspection.problems:
        raise corrupt_error(location.url, inspection.problems, resumable=False)
    _check_same_store(group, location.url, key, **same, rows=False)
    if inspection.damaged:
        rows = {name: same[name] for name in REBUILT_BY_WRITER}
        _repair_lost_chunks(group, location, inspection.damaged, rows)
    _check_same_store(group, location.url, key, **same)


def _open_for_write(location: StoreLocation) -> zarr.Group:
    """Open (or create) the group; group metadata left unreadable by a crash is rebuilt."""
    try:
        return open_group(location, mode="a")
    except (ValueError, TypeError, KeyError) as exc:  # e.g. half-written zarr.json
        logger.warning(
            "group metadata of %s is unreadable (%s); rebuilding the store", location.url, exc
        )
        location.fs.rm_file(location.child("zarr.json"))
        return open_group(location, mode="a")


def _remove_partials(location: StoreLocation) -> None:
    """Delete temporary files a killed writer left (LocalStore ``*.partial``, lock ``*.tmp``)."""
    root = location.local_path
    if root is None:
        return
    for pattern in ("**/*.partial", ".carrot-lock.*.tmp", ".carrot-lock.*.stale"):
        for path in glob.glob(os.path.join(root, pattern), recursive=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def open_writer(
    url: str,
    identity: StoreIdentity,
    *,
    ids: Sequence[str],
    labels: np.ndarray,
    split: Sequence[str],
    class_names: Sequence[str],
    dim: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    compressor: str | None = None,
    storage_options: dict | None = None,
    lock: bool = True,
    lock_ttl_s: float = DEFAULT_TTL_S,
    wait_s: float = 0.0,
) -> StoreWriter:
    """Create (preallocate) or resume the store at ``url``; a complete one is a cache hit.

    ``ids`` (N,) source-relative paths, unique; ``labels`` (N,) ints in range of ``class_names``;
    ``split`` (N,) in ("train", "val", "test"); ``dim`` feature width D; ``chunk_rows`` rows per
    chunk; ``compressor`` for features (None = fastest reads, or "zstd", "lz4", ...). Resuming
    keeps the stored chunking and compressor and checks that key, ids, labels and split match
    (StoreInputError naming the store and the fix otherwise). ``lock=False`` skips the writer
    lock: only for callers that hold it some other way. ``wait_s``: while another live writer
    holds the lock, try again every `WAIT_POLL_S` for up to this many seconds (0: refuse at
    once); a store that writer finished is then a cache hit.
    """
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim <= 0:
        raise StoreInputError(f"dim must be a positive int (the feature width), got {dim!r}")
    if (
        isinstance(chunk_rows, bool)
        or not isinstance(chunk_rows, int | np.integer)
        or chunk_rows <= 0
    ):
        raise StoreInputError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    compressor_codecs(compressor)  # validates the name
    ids_arr, labels_arr, split_arr = check_rows(
        ids=ids, labels=labels, split=split, class_names=class_names
    )
    location = resolve(url, storage_options)
    key = identity.key()
    same = {
        "dim": int(dim),
        "class_names": class_names,
        "ids": ids_arr,
        "labels": labels_arr,
        "split": split_arr,
    }

    if location.exists():  # cache hit needs no lock
        try:
            group = open_group(location, mode="r")
            done = group.attrs.get("complete") is True
        except (ValueError, TypeError, KeyError):  # unreadable: rebuilt below, under the lock
            done = False
        if done and inspect_store(group, location, chunks=True).ok:
            _check_same_store(group, location.url, key, **same)
            logger.info("store %s is complete: cache hit", location.url)
            return StoreWriter(location, group, lock=None, can_finalize=True)
        # damaged: checked (and lost chunks repaired) below, under the lock

    held = _acquire(location, lock_ttl_s, wait_s) if lock else None
    try:
        with storage_errors(f"store {location.url}", then=RESUMES):
            return _open_held(location, held, identity, same, chunk_rows, compressor)
    except BaseException:
        if held is not None:
            held.release()
        raise


def _acquire(location: StoreLocation, ttl_s: float, wait_s: float) -> StoreLock:
    """The store's lock; while another live writer holds it, retry for up to ``wait_s``."""
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        try:
            return StoreLock(location, ttl_s=ttl_s).acquire()
        except StoreLockedError:
            if time.monotonic() + WAIT_POLL_S > deadline:
                raise
            time.sleep(WAIT_POLL_S)


def _open_held(
    location: StoreLocation,
    held: StoreLock | None,
    identity: StoreIdentity,
    same: dict[str, Any],
    chunk_rows: int,
    compressor: str | None,
) -> StoreWriter:
    """Resume or create the store under the lock ``held``; a store found complete releases it."""
    key = identity.key()
    ids_arr, labels_arr, split_arr = same["ids"], same["labels"], same["split"]
    dim, class_names = same["dim"], same["class_names"]
    group = _open_for_write(location)
    if group.attrs.get("initialized") is True:
        _open_for_resume(group, location, key, same)
        attrs = group.attrs.asdict()
        if (attrs["chunk_rows"], attrs["compressor"]) != (chunk_rows, compressor):
            logger.info(
                "resuming %s with its stored chunk_rows=%s, compressor=%s",
                location.url,
                attrs["chunk_rows"],
                attrs["compressor"],
            )
        if attrs["complete"] is True:
            if held is not None:
                held.release()
            return StoreWriter(location, group, lock=None, can_finalize=True)
        _remove_partials(location)
        writer = StoreWriter(location, group, lock=held, can_finalize=True)
        logger.info(
            "resuming %s: %d of %d chunks pending",
            location.url,
            len(writer.pending_chunks()),
            writer.n_chunks,
        )
        return writer
    attrs = group.attrs.asdict()
    if attrs.get("key") not in (None, key):
        _check_same_store(group, location.url, key, **same)  # raises: another store's leftovers
    fresh = initial_attrs(
        identity,
        n=len(ids_arr),
        dim=int(dim),
        chunk_rows=int(chunk_rows),
        class_names=list(class_names),
        compressor=compressor,
    )
    group.attrs.put(fresh)
    create_arrays(group, attrs=fresh, ids=ids_arr, labels=labels_arr, split=split_arr)
    group.attrs["initialized"] = True
    logger.info(
        "created store %s: %d rows, dim %d, %d chunks",
        location.url,
        len(ids_arr),
        dim,
        fresh["n_chunks"],
    )
    return StoreWriter(location, group, lock=held, can_finalize=True)
