"""Reading a store: ``open_store(url)`` → :class:`EmbeddingStore` (NumPy, torch, Dask, streaming).

All feature readers return float32 (float16 sums overflow). By default they return the valid
rows only (``valid_only=False`` gives every row; skipped rows are zeros), optionally of one split.
Whole-store reads go straight from the chunk files into the result for local uncompressed stores
(see :mod:`stores.rowread`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.errors import StoreIncompleteError, StoreInputError, corrupt_error
from stores.identity import SCHEMA_VERSION, StoreIdentity
from stores.integrity import chunk_file_exists, inspect_store
from stores.location import StoreLocation, open_group, resolve
from stores.prefetch import prefetch as run_ahead
from stores.rowread import RowReader, gather_rows, read_all
from stores.schema import EVERY_CHUNK_ATTR, SPLITS

if TYPE_CHECKING:
    import dask.array
    import torch
    import zarr

logger = logging.getLogger(__name__)


class EmbeddingStore:
    """A store opened for reading.

    Attributes: ``url``, ``identity`` (:class:`StoreIdentity`), ``key``, ``n`` rows (all, valid or
    not), ``dim`` D, ``views`` V, ``dtype`` (storage dtype name), ``class_names``, ``attrs`` (all
    group attributes), ``complete``, ``chunk_rows``.
    """

    def __init__(
        self, location: StoreLocation, group: zarr.Group, *, features: zarr.Array | None = None
    ) -> None:
        attrs = group.attrs.asdict()
        self.attrs: dict[str, Any] = attrs
        self.url: str = location.url
        self.identity = StoreIdentity.from_dict(attrs["identity"])
        self.key: str = attrs["key"]
        self.n: int = attrs["n"]
        self.dim: int = attrs["dim"]
        self.views: int = attrs["views"]
        self.dtype: str = attrs["dtype"]
        self.class_names: list[str] = list(attrs["class_names"])
        self.complete: bool = attrs["complete"] is True
        self.chunk_rows: int = attrs["chunk_rows"]
        self._location = location
        self._group = group
        self._features = RowReader(
            group["features"] if features is None else features,
            local_root=location.local_path,
            absent_ok=self._chunk_may_be_absent,
            url=location.url,
        )
        self._cache: dict[str, np.ndarray] = {}

    def _chunk_may_be_absent(self, c: int) -> bool:
        """True when features chunk ``c`` may have no file: not written yet, or, in a store from
        before every chunk was stored, all its rows skipped (no ``valid`` file either)."""
        if not chunk_file_exists(self._location, self._group["progress"], c):
            return True
        if self.attrs.get(EVERY_CHUNK_ATTR) is True:
            return False
        return not chunk_file_exists(self._location, self._group["valid"], c)

    # -- per-row arrays (small; read once) ----------------------------------------------------
    def _row_array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            values = read_all(self._group[name], url=self.url)
            if name == "labels":
                self._check_labels(values)
            self._cache[name] = values
        return self._cache[name]

    def _check_labels(self, labels: np.ndarray) -> None:
        """`StoreCorruptError` when a label is not an index into ``class_names`` (the writer
        never writes one: the store was edited or damaged)."""
        bad = (labels < 0) | (labels >= len(self.class_names))
        if bad.any():
            from stores.errors import corrupt_error

            first = int(np.flatnonzero(bad)[0])
            raise corrupt_error(
                self.url,
                [
                    f"labels: {int(bad.sum())} row(s) outside 0..{len(self.class_names) - 1} "
                    f"(the {len(self.class_names)} class names), e.g. row {first} = "
                    f"{int(labels[first])}"
                ],
                resumable=False,
            )

    def valid_mask(self) -> np.ndarray:
        """(N,) bool, False for skipped (unreadable) rows."""
        return self._row_array("valid").astype(bool, copy=True)

    def split_array(self) -> np.ndarray:
        """(N,) str split name of every row."""
        return self._row_array("split").copy()

    def _mask(self, split: str | None, valid_only: bool) -> np.ndarray:
        mask = self._row_array("valid").astype(bool) if valid_only else np.ones(self.n, bool)
        if split is not None:
            if split not in SPLITS:
                raise StoreInputError(
                    f"unknown split {split!r}; use one of {SPLITS} or None (all rows)"
                )
            mask &= self._row_array("split") == split
        return mask

    def splits(self) -> list[str]:
        """Split names that have valid rows, in the order train, val, test."""
        valid, split = self._row_array("valid").astype(bool), self._row_array("split")
        return [s for s in SPLITS if np.any(valid & (split == s))]

    def labels(self, split: str | None = None, *, valid_only: bool = True) -> np.ndarray:
        """(n,) int64 class indices into ``class_names``."""
        return self._row_array("labels")[self._mask(split, valid_only)].astype(np.int64)

    def ids(self, split: str | None = None, *, valid_only: bool = True) -> list[str]:
        """Source-relative ids of the selected rows."""
        return self._row_array("ids")[self._mask(split, valid_only)].tolist()

    # -- features -----------------------------------------------------------------------------
    def _view_index(self, view: int) -> tuple:
        if not isinstance(view, int | np.integer) or not 0 <= view <= self.views:
            raise StoreInputError(
                f"view must be 0 (clean) .. {self.views} (augmented views) for store {self.url}, got {view!r}"
            )
        return () if self.views == 0 else (int(view),)

    def features(
        self, split: str | None = None, *, view: int = 0, valid_only: bool = True
    ) -> np.ndarray:
        """(n, D) float32 features of one view (0 = clean) for the selected rows."""
        return gather_rows(
            self._features, self._mask(split, valid_only), index=self._view_index(view)
        )

    def views_array(self, split: str | None = None, *, valid_only: bool = True) -> np.ndarray:
        """(n, V, D) float32 augmented views (without the clean view 0) of the selected rows."""
        if self.views == 0:
            raise StoreInputError(f"store {self.url} holds no augmented views (views=0)")
        return gather_rows(self._features, self._mask(split, valid_only), index=(slice(1, None),))

    def to_torch(
        self, split: str | None = None, *, device: Any = "cpu", view: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X (n, D) float32, y (n,) int64)`` tensors of the valid rows on ``device``."""
        import torch

        x = torch.from_numpy(self.features(split, view=view))  # shares memory, no copy
        y = torch.from_numpy(self.labels(split))
        return x.to(device), y.to(device)  # no-op on CPU; one synchronous copy to an accelerator

    def to_dask(self, *, view: int = 0, rows: int | None = None) -> dask.array.Array:
        """(N, D) float32 Dask array of ALL rows (mask with :meth:`valid_mask`), Zarr-chunked
        (or ``rows`` per block, rounded to whole chunks)."""
        import dask.array as da

        index = self._view_index(view)
        array = self._group["features"]
        if rows is None:
            x = da.from_zarr(array)
        else:
            block = max(1, rows // self.chunk_rows) * self.chunk_rows
            x = da.from_zarr(array, chunks=(block, *array.shape[1:]))
        if index:
            x = x[:, index[0], :]
        return x.astype(np.float32)

    def iter_chunks(
        self, split: str | None = None, *, rows: int = 8192, prefetch: int = 2, view: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(X (n, D) float32, y (n,) int64)`` blocks of the valid rows of ``split``.

        Blocks hold about ``rows`` store rows (whole chunks), in store order, each row exactly
        once; a background thread reads ``prefetch`` blocks ahead.
        """
        index = self._view_index(view)
        mask = self._mask(split, valid_only=True)
        labels = self._row_array("labels").astype(np.int64)

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            selected = np.flatnonzero(mask)
            if selected.size == 0:
                return
            lo, hi = int(selected[0]), int(selected[-1]) + 1
            for start, block in self._features.blocks(lo, hi, rows=rows):
                stop = start + len(block)
                sel = mask[start:stop]
                if not sel.any():
                    continue
                src = block[(slice(None), *index)] if index else block
                x = np.array(src if sel.all() else src[sel], dtype=np.float32)  # owns its memory
                yield x, labels[start:stop][sel]

        return run_ahead(blocks(), depth=prefetch)

    def read_rows(
        self, split: str | None, start: int, stop: int, *, view: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(X (n, D) float32, y (n,) int64)``: the valid rows of ``split`` among store rows
        ``start:stop`` (a random-access block for streaming; align to ``chunk_rows`` for speed)."""
        index = self._view_index(view)
        start, stop = max(0, int(start)), min(self.n, int(stop))
        sel = self._mask(split, valid_only=True)[start:stop]
        if stop <= start or not sel.any():
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        block = self._features.read(start, stop)
        src = block[(slice(None), *index)] if index else block
        x = np.asarray(src[sel] if not sel.all() else src, dtype=np.float32)
        return x, self._row_array("labels")[start:stop][sel].astype(np.int64)

    def nbytes(self) -> int:
        """Bytes of all features as stored (N x (1+V) x D x itemsize), uncompressed."""
        return int(np.prod(self._features.shape)) * np.dtype(self.dtype).itemsize

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({self.url!r}, n={self.n}, dim={self.dim}, views={self.views}, "
            f"dtype={self.dtype}, complete={self.complete})"
        )


def open_store(
    url: str, *, storage_options: dict | None = None, require_complete: bool = True
) -> EmbeddingStore:
    """Open the store at ``url`` for reading, after its cheap consistency checks.

    Raises StoreNotFoundError when there is none; StoreIncompleteError when it is not complete
    (unless ``require_complete=False``; a store whose preallocation was cut short always raises
    it); StoreCorruptError when its metadata is unreadable or inconsistent (shapes, dtypes,
    arrays against the attributes) or, for a complete store, when a chunk marked written has no
    file or a raw chunk file has the wrong size (:mod:`stores.integrity`; no chunk is read);
    StoreInputError when it is not a carrot store of this schema.
    """
    location = resolve(url, storage_options)
    group = open_group(location, mode="r")
    attrs = group.attrs.asdict()
    if attrs.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise StoreInputError(
            f"{location.url} is not a carrot embedding store of schema {SCHEMA_VERSION} "
            f"(schema_version={attrs.get('schema_version')!r}); write it again with this version "
            f"(carrot embed), or check it with `carrot store verify {location.url}`"
        )
    if attrs.get("initialized") is not True:
        raise StoreIncompleteError(
            f"store {location.url} was never fully created (its writer stopped while "
            f"preallocating, or it is not a carrot store); re-run `carrot embed` to rebuild it, "
            f"or check it with `carrot store verify {location.url}`"
        )
    complete = attrs.get("complete") is True
    inspection = inspect_store(group, location, chunks=require_complete and complete)
    if inspection.problems:
        raise corrupt_error(location.url, inspection.problems, resumable=False)
    if require_complete and not complete:
        raise StoreIncompleteError(
            f"store {location.url} is not complete (its writer was interrupted or is still "
            f"running); re-run `carrot embed` to resume it, or check it with "
            f"`carrot store verify {location.url}`"
        )
    if require_complete and inspection.chunk_problems:
        raise corrupt_error(location.url, inspection.chunk_problems, resumable=True)
    return EmbeddingStore(location, group, features=inspection.arrays["features"])
