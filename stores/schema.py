"""The store's layout (schema version 1): array names, chunking, compressors, preallocation.

Arrays (N rows, all chunked by ``chunk_rows`` along rows):

- ``features`` (N, D), or (N, 1+V, D) with V augmented views (index 0 = clean view); float16 or
  float32; chunks ``(chunk_rows, D)`` / ``(chunk_rows, 1+V, D)``; uncompressed by default.
- ``labels`` (N,) int64 · ``ids`` (N,) str (source-relative paths) · ``split`` (N,) str in
  :data:`SPLITS` · ``valid`` (N,) bool (False = image skipped) · ``errors`` (N,) str ("" if fine).
- ``progress`` (n_chunks,) bool, chunk size 1: set once a chunk's rows are written.

Every chunk of a row array is stored as a file, even one equal to the fill value (attribute
``every_chunk_stored``). Group attributes: see :func:`initial_attrs`; ``complete`` turns True
last, after every check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.errors import StoreInputError
from stores.identity import SCHEMA_VERSION, StoreIdentity

if TYPE_CHECKING:
    import zarr

SPLITS = ("train", "val", "test")
"""Allowed split names, in canonical order."""
DEFAULT_CHUNK_ROWS = 1024
COMPRESSORS = ("zstd", "lz4", "blosc-zstd", "gzip")
ROW_ARRAYS = ("features", "labels", "ids", "split", "valid", "errors")
ALL_ARRAYS = (*ROW_ARRAYS, "progress")
EVERY_CHUNK_ATTR = "every_chunk_stored"
"""Group attribute: True when every chunk of every row array has a file, even one equal to the
fill value (Zarr leaves those out by default), so a lost chunk file is always detectable."""
STORE_EVERY_CHUNK = {"write_empty_chunks": True}
"""Zarr array config of the row arrays (see :data:`EVERY_CHUNK_ATTR`)."""


def n_chunks_of(n: int, chunk_rows: int) -> int:
    """Number of row chunks for ``n`` rows."""
    return math.ceil(n / chunk_rows)


def chunk_range(i: int, *, n: int, chunk_rows: int) -> range:
    """Rows of chunk ``i`` (the last chunk may be short)."""
    start = i * chunk_rows
    return range(start, min(start + chunk_rows, n))


def feature_shape(n: int, *, dim: int, views: int) -> tuple[int, ...]:
    """``(n, dim)`` without views, ``(n, 1 + views, dim)`` with."""
    return (n, dim) if views == 0 else (n, 1 + views, dim)


def compressor_codecs(name: str | None) -> tuple[Any, ...] | None:
    """Zarr v3 compressor codecs for ``name`` (None/"none" → uncompressed)."""
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if name is None or name == "none":
        return None
    table = {
        "zstd": lambda: (ZstdCodec(level=3),),
        "lz4": lambda: (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "blosc-zstd": lambda: (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),),
        "gzip": lambda: (GzipCodec(level=5),),
    }
    if name not in table:
        raise StoreInputError(
            f"unknown compressor {name!r}; use None (default, fastest reads) or one of {COMPRESSORS}"
        )
    return table[name]()


def check_rows(
    *,
    ids: Sequence[str],
    labels: np.ndarray,
    split: Sequence[str],
    class_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate per-row inputs; returns ``(ids str (N,), labels int64 (N,), split str (N,))``."""
    ids_arr = np.asarray(list(ids), dtype=str)
    split_arr = np.asarray(list(split), dtype=str)
    labels_in = np.asarray(labels)
    n = len(ids_arr)
    if n == 0:
        raise StoreInputError("cannot write an empty store: ids is empty; check the data source")
    if labels_in.shape != (n,) or len(split_arr) != n:
        raise StoreInputError(
            f"ids ({n}), labels {labels_in.shape} and split ({len(split_arr)}) must all have N rows"
        )
    if labels_in.dtype.kind not in "iu":
        raise StoreInputError(f"labels must be integers, got dtype {labels_in.dtype}")
    labels_arr = labels_in.astype(np.int64)
    if len(class_names) == 0 or len(set(class_names)) != len(class_names):
        raise StoreInputError("class_names must be non-empty and unique")
    bad = np.flatnonzero((labels_arr < 0) | (labels_arr >= len(class_names)))
    if bad.size:
        raise StoreInputError(
            f"labels out of range 0..{len(class_names) - 1} at rows {bad[:5].tolist()} "
            f"(ids {ids_arr[bad[:5]].tolist()}); fix the labels or class_names"
        )
    unknown = sorted(set(np.unique(split_arr).tolist()) - set(SPLITS))
    if unknown:
        raise StoreInputError(f"split values {unknown} are not allowed; use {SPLITS}")
    uniq, counts = np.unique(ids_arr, return_counts=True)
    if uniq.size != n:
        raise StoreInputError(f"ids must be unique; repeated: {uniq[counts > 1][:5].tolist()}")
    return ids_arr, labels_arr, split_arr


def initial_attrs(
    identity: StoreIdentity,
    *,
    n: int,
    dim: int,
    chunk_rows: int,
    class_names: Sequence[str],
    compressor: str | None,
) -> dict[str, Any]:
    """Group attributes written at creation (``complete`` False until finalize)."""
    import zarr

    return {
        "schema_version": SCHEMA_VERSION,
        "key": identity.key(),
        "identity": identity.to_dict(),
        "n": n,
        "dim": dim,
        "views": identity.views,
        "dtype": identity.dtype,
        "chunk_rows": chunk_rows,
        "n_chunks": n_chunks_of(n, chunk_rows),
        "compressor": compressor,
        "class_names": list(class_names),
        "splits": list(SPLITS),
        "library_versions": {"zarr": zarr.__version__, "numpy": np.__version__},
        "skipped": [],
        "timings": {},
        EVERY_CHUNK_ATTR: True,
        "initialized": False,
        "complete": False,
    }


def row_array(group: zarr.Group, name: str) -> zarr.Array:
    """Row array ``name`` of ``group``, opened to store every chunk it writes."""
    return group[name].with_config(STORE_EVERY_CHUNK)


def create_arrays(
    group: zarr.Group,
    *,
    attrs: dict[str, Any],
    ids: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray,
) -> None:
    """(Re)create every array at full shape and write ids/labels/split; overwrites old arrays."""
    n, dim, views, rows = attrs["n"], attrs["dim"], attrs["views"], attrs["chunk_rows"]
    fshape = feature_shape(n, dim=dim, views=views)
    group.create_array(
        "features",
        shape=fshape,
        chunks=(rows, *fshape[1:]),
        dtype=attrs["dtype"],
        compressors=compressor_codecs(attrs["compressor"]),
        fill_value=0,
        dimension_names=("row", "dim") if views == 0 else ("row", "view", "dim"),
        overwrite=True,
        config=STORE_EVERY_CHUNK,
    )
    row_specs = {"labels": ("int64", -1), "ids": (str, ""), "split": (str, "")}
    row_specs |= {"valid": ("bool", False), "errors": (str, "")}
    written = {}
    for name, (dtype, fill) in row_specs.items():
        written[name] = group.create_array(
            name,
            shape=(n,),
            chunks=(rows,),
            dtype=dtype,
            fill_value=fill,
            dimension_names=("row",),
            overwrite=True,
            config=STORE_EVERY_CHUNK,
        )
    group.create_array(
        "progress",
        shape=(n_chunks_of(n, rows),),
        chunks=(1,),
        dtype="bool",
        fill_value=False,
        compressors=None,
        dimension_names=("chunk",),
        overwrite=True,
    )
    written["ids"][:] = ids
    written["labels"][:] = labels
    written["split"][:] = split
