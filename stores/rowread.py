"""Reading row ranges of a row-chunked Zarr array into NumPy, at close to ``np.load`` speed.

For a local, uncompressed array (a single little-endian ``bytes`` codec, chunks spanning whole
rows) the chunk files are raw C-order bytes, so rows are read straight from them into the
destination buffer with ``readinto``: no decode step, no intermediate copy. Everything else
(compressed arrays, remote stores, strings) goes through Zarr with large block reads.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from stores.errors import StoreError, corrupt_error

if TYPE_CHECKING:
    import zarr

CHUNK_READ_ERRORS = (RuntimeError, ValueError, OSError)
"""What Zarr and its codecs raise for a garbled or truncated chunk (e.g. zstd RuntimeError)."""
BLOCK_BYTES = 64 * 2**20
"""Target size of one block read through Zarr (the fallback path)."""


def raw_layout(array: zarr.Array) -> bool:
    """True when chunk files hold the array's raw native bytes, whole rows per chunk."""
    from zarr.codecs import BytesCodec

    md = array.metadata
    if getattr(md, "zarr_format", None) != 3 or array.dtype.kind not in "fiub":
        return False
    codecs = md.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    if array.dtype.itemsize > 1 and (endian is None or endian.value != sys.byteorder):
        return False
    return tuple(array.chunks[1:]) == tuple(array.shape[1:])


class RowReader:
    """Row-range reads of one array whose chunks span whole rows.

    Parameters
    ----------
    array : zarr.Array
        Shape ``(N, ...)``, chunked ``(chunk_rows, ...)``.
    local_root : str or None
        Local folder of the Zarr group holding ``array`` (enables the direct-file path).
    absent_ok : callable or None
        ``absent_ok(c)`` says whether chunk ``c`` may have no file (then it reads as the fill
        value); when it says no, the direct path raises StoreCorruptError. None: any chunk may
        be absent (plain Zarr semantics).
    url : str or None
        The store as the user named it, for error messages (default ``local_root``).
    """

    def __init__(
        self,
        array: zarr.Array,
        *,
        local_root: str | None,
        absent_ok: Callable[[int], bool] | None = None,
        url: str | None = None,
    ) -> None:
        self.array = array
        self._absent_ok = absent_ok
        self._url = url or local_root or ""
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.chunk_rows: int = int(array.chunks[0])
        self.dtype = np.dtype(array.dtype) if array.dtype.kind in "fiub" else None
        self.direct = local_root is not None and raw_layout(array)
        self._root = local_root
        if self.direct:
            self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
            self._fill = array.metadata.fill_value

    def _chunk_path(self, c: int) -> str:
        key = self.array.metadata.encode_chunk_key((c,) + (0,) * (len(self.shape) - 1))
        return os.path.join(self._root, *self.array.path.split("/"), *key.split("/"))

    def _read_direct(self, lo: int, hi: int, out: np.ndarray) -> None:
        dst = memoryview(out.reshape(-1).view(np.uint8))
        rb, cr = self._row_bytes, self.chunk_rows
        for c in range(lo // cr, (hi - 1) // cr + 1):
            a, b = max(lo, c * cr), min(hi, (c + 1) * cr)
            part = dst[(a - lo) * rb : (b - lo) * rb]
            try:
                with open(self._chunk_path(c), "rb", buffering=0) as f:
                    f.seek((a - c * cr) * rb)
                    got = f.readinto(part)
            except FileNotFoundError as exc:  # not written yet, or lost
                if self._absent_ok is not None and not self._absent_ok(c):
                    what = "is missing, but the progress record says it was written"
                    raise self._damaged(c, what) from exc
                out[a - lo : b - lo] = self._fill
                continue
            if got != len(part):
                raise self._damaged(c, "is truncated")

    def _damaged(self, c: int, what: str) -> StoreError:
        key = self.array.metadata.encode_chunk_key((c,) + (0,) * (len(self.shape) - 1))
        return corrupt_error(
            self._url, [f"chunk file {self.array.path}/{key} {what}"], resumable=True
        )

    def read(self, lo: int, hi: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi`` as an array of shape ``(hi - lo, ...)`` (into ``out`` if given)."""
        lo, hi = max(0, lo), min(hi, self.shape[0])
        if out is None:
            if not self.direct:
                return self._read_zarr(lo, hi)
            out = np.empty((max(0, hi - lo), *self.shape[1:]), self.dtype)
        if hi <= lo:
            return out
        if self.direct and out.dtype == self.dtype and out.flags.c_contiguous:
            self._read_direct(lo, hi, out)
        else:
            out[...] = self._read_zarr(lo, hi)
        return out

    def _read_zarr(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` through Zarr; StoreCorruptError when a chunk cannot be decoded."""
        try:
            return np.asarray(self.array[lo:hi])
        except CHUNK_READ_ERRORS as exc:
            raise unreadable_rows(self._url, self.array.path, lo, hi, exc) from exc

    def blocks(
        self, lo: int, hi: int, *, rows: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` covering rows ``lo:hi``, blocks aligned to chunk boundaries.

        ``rows`` is rounded to whole chunks; by default one chunk (direct path) or about
        :data:`BLOCK_BYTES` (Zarr path). On the direct path each block is a view into one reused
        buffer: use or copy it before asking for the next.
        """
        cr = self.chunk_rows
        if rows is None:
            if self.direct:
                rows = cr
            else:
                itemsize = self.dtype.itemsize if self.dtype is not None else 64
                row_bytes = max(1, math.prod(self.shape[1:]) * itemsize)
                rows = BLOCK_BYTES // row_bytes
        rows = max(cr, rows // cr * cr)
        buffer = np.empty((rows, *self.shape[1:]), self.dtype) if self.direct else None
        start = lo
        while start < hi:
            stop = min(hi, (start // cr) * cr + rows)
            if buffer is not None:
                yield start, self.read(start, stop, out=buffer[: stop - start])
            else:
                yield start, self.read(start, stop)
            start = stop


def unreadable_rows(url: str, name: str, lo: int, hi: int, exc: BaseException) -> StoreError:
    """StoreCorruptError: rows ``lo:hi`` of array ``name`` of store ``url`` cannot be read."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    problem = f"array {name}: rows {lo}..{hi - 1} are unreadable ({detail})"
    return corrupt_error(url, [problem], resumable=False)


def read_all(array: zarr.Array, *, url: str) -> np.ndarray:
    """The whole (small, per-row) ``array`` as NumPy; StoreCorruptError naming it if unreadable."""
    try:
        return np.asarray(array[:])
    except CHUNK_READ_ERRORS as exc:
        raise unreadable_rows(url, array.path, 0, array.shape[0], exc) from exc


def gather_rows(
    reader: RowReader,
    mask: np.ndarray,
    *,
    index: tuple = (),
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Rows where ``mask`` is True, indexed by ``index`` along the trailing axes, cast to ``dtype``.

    ``mask`` is (N,) bool; ``index`` e.g. ``(0,)`` picks view 0 of ``(N, 1+V, D)`` features.
    Reads only the rows between the first and last selected one, block by block.
    """
    rows = np.flatnonzero(mask)
    probe = np.empty((0, *reader.shape[1:]), np.uint8)[(slice(None), *index)]
    if rows.size == 0:
        return np.empty(probe.shape, dtype)
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    out = np.empty((rows.size, *probe.shape[1:]), dtype)
    if not index and rows.size == hi - lo and reader.direct and np.dtype(dtype) == reader.dtype:
        return reader.read(lo, hi, out=out)  # straight from the files into the result
    pos = 0
    for start, block in reader.blocks(lo, hi):
        sel = mask[start : start + len(block)]
        src = block[(slice(None), *index)] if index else block
        if sel.all():
            out[pos : pos + len(src)] = src
            pos += len(src)
        else:
            picked = src[sel]
            out[pos : pos + len(picked)] = picked
            pos += len(picked)
    return out
