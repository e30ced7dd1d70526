"""Cheap consistency checks of a store, run by every reader at open time, by ``verify_store``, by
``finalize`` and by a writer resuming or re-using a store.

Cheap means no chunk is read: the group attributes (present, of the right types), every array's
metadata (present, readable, shapes/dtypes/chunking against the attributes), and ONE listing per
array of its chunk files — every chunk the progress record marks as written must have a file in
every row array, and raw uncompressed features chunks must have their full size (Zarr writes the
last, partial chunk at full size too). ``progress`` has chunk size 1 and fill value False, so a
missing progress chunk means "not written".

Stores made before the writer stored every chunk (no ``every_chunk_stored`` attribute) left out
chunks equal to the fill value: ``errors`` chunks with no error, and the ``features`` and ``valid``
chunks of a chunk whose rows were all skipped. Those absences are accepted there, and only there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.schema import ALL_ARRAYS, EVERY_CHUNK_ATTR, ROW_ARRAYS, feature_shape, n_chunks_of

if TYPE_CHECKING:
    import zarr

    from stores.location import StoreLocation

REQUIRED_ATTRS = ("schema_version", "key", "identity", "n", "dim", "views", "dtype")
REQUIRED_ATTRS += ("chunk_rows", "n_chunks", "class_names", "complete")
_INT_ATTRS = {"n": 1, "dim": 1, "views": 0, "chunk_rows": 1, "n_chunks": 1}  # name: minimum
_DTYPE_KINDS = {"labels": "iu", "valid": "b", "progress": "b", "ids": "TUO", "split": "TUO"}
_DTYPE_KINDS["errors"] = "TUO"
REBUILT_BY_WRITER = ("ids", "labels", "split")
"""Row arrays written whole at creation (from the writer's inputs), not chunk by chunk."""
MAX_NAMED = 10
"""At most this many chunks are named in one problem."""


@dataclass(frozen=True)
class Inspection:
    """Outcome of :func:`inspect_store`.

    ``problems``: damage to attributes or array metadata (a writer cannot resume such a store).
    ``damaged``: array name → chunks marked written whose file is missing or has the wrong size
    (``"progress"``: chunks of a complete store not marked written); ``chunk_problems`` says the
    same in words. ``written``: (n_chunks,) bool progress, or None
    when chunks were not inspected (or metadata is broken).
    """

    attrs: dict[str, Any]
    arrays: dict[str, zarr.Array] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    chunk_problems: list[str] = field(default_factory=list)
    damaged: dict[str, list[int]] = field(default_factory=dict)
    written: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems and not self.chunk_problems

    @property
    def all_problems(self) -> list[str]:
        """Metadata problems, then chunk-file problems."""
        return [*self.problems, *self.chunk_problems]


def unreadable(location: StoreLocation, name: str, exc: BaseException) -> str:
    """``<url>/<name> is unreadable (<error>)``, on one line."""
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"{location.url}/{name} is unreadable ({detail})"


def attr_problems(attrs: dict[str, Any]) -> list[str]:
    """Required group attributes that are missing or of the wrong type."""
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        return [
            f"attributes missing: {missing} (not a carrot store, or its creation was cut short)"
        ]
    problems = []
    for name, low in _INT_ATTRS.items():
        value = attrs[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"attribute {name} is {value!r}, expected an int >= {low}")
    if attrs["dtype"] not in ("float16", "float32"):
        problems.append(f"attribute dtype is {attrs['dtype']!r}, expected 'float16' or 'float32'")
    names = attrs["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        problems.append("attribute class_names is not a non-empty list of names")
    if not isinstance(attrs["identity"], dict):
        problems.append("attribute identity is not a mapping")
    return problems


def open_arrays(
    group: zarr.Group, location: StoreLocation
) -> tuple[dict[str, zarr.Array], list[str]]:
    """Every array of the schema by name, and problems for the absent or unreadable ones."""
    import zarr

    arrays: dict[str, zarr.Array] = {}
    absent, problems = [], []
    for name in ALL_ARRAYS:  # by name, no member listing: the lock file is no array
        try:
            node = group[name]
        except KeyError:
            absent.append(name)
            continue
        except Exception as exc:  # torn or edited zarr.json: JSON, metadata or type errors
            problems.append(unreadable(location, f"{name}/zarr.json", exc))
            continue
        if not isinstance(node, zarr.Array):
            problems.append(f"{name} is a group, expected an array")
        else:
            arrays[name] = node
    if absent:
        problems.insert(0, f"arrays missing: {absent}")
    return arrays, problems


def layout_problems(attrs: dict[str, Any], arrays: dict[str, zarr.Array]) -> list[str]:
    """Shapes, row chunking and dtypes of the arrays against the attributes."""
    problems = []
    n, dim, views, chunk_rows = attrs["n"], attrs["dim"], attrs["views"], attrs["chunk_rows"]
    if attrs["n_chunks"] != n_chunks_of(n, chunk_rows):
        problems.append(f"n_chunks attribute {attrs['n_chunks']} != ceil({n} / {chunk_rows})")
    expected = {name: (n,) for name in ROW_ARRAYS if name != "features"}
    expected["features"] = feature_shape(n, dim=dim, views=views)
    expected["progress"] = (n_chunks_of(n, chunk_rows),)
    for name, shape in expected.items():
        array = arrays[name]
        if tuple(array.shape) != shape:
            problems.append(f"array {name} has shape {tuple(array.shape)}, expected {shape}")
        elif name == "progress" and tuple(array.chunks) != (1,):
            problems.append(f"array progress has chunks {tuple(array.chunks)}, expected (1,)")
        elif name != "progress" and tuple(array.chunks) != (chunk_rows, *shape[1:]):
            problems.append(
                f"array {name} has chunks {tuple(array.chunks)}, expected {(chunk_rows, *shape[1:])}"
            )
    if str(arrays["features"].dtype) != attrs["dtype"]:
        problems.append(
            f"features dtype {arrays['features'].dtype} != dtype attribute {attrs['dtype']}"
        )
    for name, kinds in _DTYPE_KINDS.items():
        if arrays[name].dtype.kind not in kinds:
            problems.append(f"array {name} has dtype {arrays[name].dtype}")
    return problems


def chunk_key(array: zarr.Array, c: int) -> str:
    """Key (path inside the array's folder) of row chunk ``c``, e.g. ``c/3/0``."""
    return array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))


def chunk_keys(array: zarr.Array, count: int) -> list[str]:
    """Keys of row chunks ``0..count-1`` (fast: from one template when the encoding allows)."""
    sentinel = 987654321
    template = chunk_key(array, sentinel).replace(str(sentinel), "{}")
    if template.count("{}") == 1 and template.format(1) == chunk_key(array, 1):
        return [template.format(c) for c in range(count)]
    return [chunk_key(array, c) for c in range(count)]


def chunk_file_exists(location: StoreLocation, array: zarr.Array, c: int) -> bool:
    """True when row chunk ``c`` of ``array`` has a file (one ``exists`` call)."""
    return location.fs.exists(location.child(f"{array.path}/{chunk_key(array, c)}"))


def list_files(location: StoreLocation, name: str, *, sizes: bool) -> dict[str, int]:
    """Files under ``<store>/<name>/`` by relative key (``c/0/0``) → size in bytes (-1 unless
    ``sizes``): one listing (``fs.find``; a ``scandir`` walk on the local filesystem, ~4x faster)."""
    prefix = location.child(name).rstrip("/") + "/"
    if location.local_path is not None:
        return _walk_local(os.path.join(location.local_path, name), sizes=sizes)
    found = location.fs.find(prefix, detail=sizes)
    paths = found.items() if sizes else ((p, {"size": -1}) for p in found)
    out = {}
    for path, info in paths:
        rel = path[path.index(prefix) + len(prefix) :] if prefix in path else path
        out[rel] = int(info.get("size", -1))
    return out


def _walk_local(root: str, *, sizes: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    stack = [root]
    start = len(root) + 1
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                key = entry.path[start:].replace(os.sep, "/")
                out[key] = entry.stat().st_size if sizes else -1
    return out


def written_from_listing(location: StoreLocation, progress: zarr.Array) -> np.ndarray:
    """(n_chunks,) bool: progress chunks that have a file (fill value False is never stored)."""
    files = list_files(location, progress.path, sizes=False)
    return np.array([k in files for k in chunk_keys(progress, progress.shape[0])], bool)


def raw_chunk_bytes(array: zarr.Array) -> int | None:
    """Exact size of every chunk file of a raw uncompressed array, None when it varies."""
    from stores.rowread import raw_layout

    if not raw_layout(array):
        return None
    return math.prod(array.chunks) * array.dtype.itemsize


def _named(chunks: np.ndarray) -> str:
    shown = chunks[:MAX_NAMED].tolist()
    return f"{shown}" + (f" (+{chunks.size - MAX_NAMED} more)" if chunks.size > MAX_NAMED else "")


def chunk_damage(
    location: StoreLocation,
    arrays: dict[str, zarr.Array],
    attrs: dict[str, Any],
    written: np.ndarray,
) -> tuple[list[str], dict[str, list[int]]]:
    """Problems and damaged chunks (by array) among the ``written`` (n_chunks,) bool chunks."""
    strict = attrs.get(EVERY_CHUNK_ATTR) is True
    present, sizes = {}, {}
    for name in ROW_ARRAYS:
        array = arrays[name]
        files = list_files(location, name, sizes=raw_chunk_bytes(array) is not None)
        keys = chunk_keys(array, len(written))
        present[name] = np.array([k in files for k in keys], bool)
        sizes[name] = np.array([files.get(k, -1) for k in keys], np.int64)
    all_skipped = ~present["features"] & ~present["valid"]  # old stores left both out
    problems: list[str] = []
    damaged: dict[str, list[int]] = {}
    for name in ROW_ARRAYS:
        lost = written & ~present[name]
        if not strict and name == "errors":
            lost[:] = False
        elif not strict and name in ("features", "valid"):
            lost &= ~all_skipped
        bad = set(np.flatnonzero(lost).tolist())
        if lost.any():
            key = chunk_key(arrays[name], int(np.flatnonzero(lost)[0]))
            problems.append(
                f"{name}: chunk files missing for written chunks {_named(np.flatnonzero(lost))} "
                f"(e.g. {name}/{key})"
            )
        expected = raw_chunk_bytes(arrays[name])
        if expected is not None:
            wrong = np.flatnonzero(written & present[name] & (sizes[name] != expected))
            if wrong.size:
                problems.append(_size_problem(name, arrays[name], wrong, sizes[name], expected))
                bad |= set(wrong.tolist())
        if bad:
            damaged[name] = sorted(bad)
    return problems, damaged


def _size_problem(
    name: str, array: zarr.Array, wrong: np.ndarray, sizes: np.ndarray, expected: int
) -> str:
    c = int(wrong[0])
    got = int(sizes[c])
    what = (
        f"is truncated ({got} of {expected} bytes)"
        if got < expected
        else (f"has {got} bytes, expected {expected}")
    )
    more = f"; {wrong.size - 1} more chunk files have wrong sizes" if wrong.size > 1 else ""
    return f"{name}: chunk file {name}/{chunk_key(array, c)} {what}{more} (chunks {_named(wrong)})"


def inspect_store(
    group: zarr.Group,
    location: StoreLocation,
    *,
    chunks: bool,
    written: np.ndarray | None = None,
) -> Inspection:
    """Cheap checks of an opened group; with ``chunks``, the chunk files of written chunks too.

    ``written`` (n_chunks,) bool overrides the progress record read from the file listing.
    """
    attrs = group.attrs.asdict()
    problems = attr_problems(attrs)
    if problems:
        return Inspection(attrs, problems=problems)
    arrays, problems = open_arrays(group, location)
    if problems:
        return Inspection(attrs, arrays, problems=problems)
    problems = layout_problems(attrs, arrays)
    if problems or not chunks:
        return Inspection(attrs, arrays, problems=problems)
    if written is None:
        written = written_from_listing(location, arrays["progress"])
    chunk_problems, damaged = chunk_damage(location, arrays, attrs, written)
    unset = np.flatnonzero(~written)
    if attrs["complete"] is True and unset.size:  # a complete store has every chunk written
        chunk_problems.insert(0, f"progress unset for chunks {_named(unset)} of a complete store")
        damaged["progress"] = unset.tolist()
    return Inspection(attrs, arrays, [], chunk_problems, damaged, written)
