"""Integrity checks of a store: ``verify_store(url)`` → :class:`VerifyReport`.

Checked: the schema version and attributes, every array present with consistent shapes and
dtypes, all progress flags, the ``complete`` marker, the content key recomputed from the stored
identity (against the ``key`` attribute and the folder name's key prefix), labels in range of
``class_names``, split values, the ``skipped`` list against ``valid``, and finite features in valid
rows (read block by block, never the whole array at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.errors import StoreError, StoreInputError
from stores.identity import SCHEMA_VERSION, StoreIdentity
from stores.location import StoreLocation, key_prefix_of, open_group, resolve
from stores.rowread import RowReader
from stores.schema import ALL_ARRAYS, SPLITS, feature_shape, n_chunks_of

if TYPE_CHECKING:
    import zarr

logger = logging.getLogger(__name__)

REQUIRED_ATTRS = ("schema_version", "key", "identity", "n", "dim", "views", "dtype")
REQUIRED_ATTRS += ("chunk_rows", "n_chunks", "class_names", "complete")
MAX_NAMED = 10
"""At most this many ids are named in one problem."""


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :func:`verify_store`: ``ok`` is True exactly when ``problems`` is empty."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # n, dim, views, dtype, key, counts...


def name_ids(ids: np.ndarray | list[str]) -> str:
    """``'a', 'b', ... (+N more)`` for error messages."""
    ids = list(ids)
    shown = ", ".join(repr(str(i)) for i in ids[:MAX_NAMED])
    return shown + (f" (+{len(ids) - MAX_NAMED} more)" if len(ids) > MAX_NAMED else "")


def nonfinite_ids(
    features: zarr.Array, valid: np.ndarray, ids: np.ndarray, *, local_root: str | None
) -> list[str]:
    """Ids of valid rows holding NaN or Inf, read block by block."""
    reader = RowReader(features, local_root=local_root)
    bad: list[str] = []
    for start, block in reader.blocks(0, reader.shape[0]):
        stop = start + len(block)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        rows = np.flatnonzero(valid[start:stop] & ~finite) + start
        bad.extend(ids[rows].tolist())
    return bad


def _check_layout(attrs: dict[str, Any], arrays: dict[str, zarr.Array]) -> list[str]:
    problems = []
    n, dim, views, chunk_rows = attrs["n"], attrs["dim"], attrs["views"], attrs["chunk_rows"]
    if attrs["n_chunks"] != n_chunks_of(n, chunk_rows):
        problems.append(f"n_chunks attribute {attrs['n_chunks']} != ceil({n} / {chunk_rows})")
    expected = {name: (n,) for name in ("labels", "ids", "split", "valid", "errors")}
    expected["features"] = feature_shape(n, dim=dim, views=views)
    expected["progress"] = (n_chunks_of(n, chunk_rows),)
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            problems.append(f"array {name} has shape {tuple(arrays[name].shape)}, expected {shape}")
        elif name != "progress" and arrays[name].chunks[0] != chunk_rows:
            problems.append(f"array {name} has row chunks {arrays[name].chunks[0]} != {chunk_rows}")
    if str(arrays["features"].dtype) != attrs["dtype"]:
        problems.append(
            f"features dtype {arrays['features'].dtype} != dtype attribute {attrs['dtype']}"
        )
    return problems


def _check_identity(attrs: dict[str, Any], url: str) -> list[str]:
    try:
        identity = StoreIdentity.from_dict(attrs["identity"])
    except StoreInputError as exc:
        return [f"identity attribute is invalid: {exc}"]
    problems = []
    key = identity.key()
    if key != attrs["key"]:
        problems.append(
            f"content key recomputed from identity {key[:12]}… != key attribute {str(attrs['key'])[:12]}…"
        )
    prefix = key_prefix_of(url)
    if prefix is not None and prefix != key[:12]:
        problems.append(f"folder name key prefix {prefix} != content key {key[:12]}")
    for name in ("views", "dtype"):
        if attrs[name] != getattr(identity, name):
            problems.append(
                f"{name} attribute {attrs[name]!r} != identity.{name} {getattr(identity, name)!r}"
            )
    return problems


def collect_problems(
    group: zarr.Group, location: StoreLocation, *, require_complete: bool = True
) -> tuple[list[str], dict[str, Any]]:
    """All problems of an opened store group, and a summary. Reads features block by block."""
    attrs = group.attrs.asdict()
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        return [
            f"attributes missing: {missing} (not a carrot store, or its creation was cut short)"
        ], {}
    summary = {k: attrs[k] for k in ("key", "n", "dim", "views", "dtype", "complete")}
    problems = []
    if attrs["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {attrs['schema_version']} != supported {SCHEMA_VERSION}")
    if require_complete and attrs["complete"] is not True:
        problems.append("complete marker is not set (the writer did not finish)")
    absent = [
        a for a in ALL_ARRAYS if a not in group
    ]  # no member listing: the lock file is no array
    if absent:
        return [*problems, f"arrays missing: {absent}"], summary
    arrays = {name: group[name] for name in ALL_ARRAYS}
    problems += _check_identity(attrs, location.url)
    layout = _check_layout(attrs, arrays)
    problems += layout
    if layout:
        return problems, summary

    not_done = np.flatnonzero(~arrays["progress"][:].astype(bool))
    if not_done.size:
        problems.append(
            f"{not_done.size} chunks not written (progress flags unset): {not_done[:MAX_NAMED].tolist()}"
        )
    ids, labels, split = arrays["ids"][:], arrays["labels"][:], arrays["split"][:]
    valid = arrays["valid"][:].astype(bool)
    n_classes = len(attrs["class_names"])
    out_of_range = (labels < 0) | (labels >= n_classes)
    if out_of_range.any():
        problems.append(
            f"labels out of range 0..{n_classes - 1} for ids {name_ids(ids[out_of_range])}"
        )
    bad_split = ~np.isin(split, np.asarray(SPLITS, dtype=split.dtype))
    if bad_split.any():
        problems.append(f"split values {sorted(set(split[bad_split].tolist()))} not in {SPLITS}")
    if attrs["complete"] is True:
        listed = [s.get("id") for s in attrs.get("skipped", [])]
        if sorted(listed) != sorted(ids[~valid].tolist()):
            problems.append("skipped attribute does not list exactly the rows with valid=False")
    try:
        bad = nonfinite_ids(arrays["features"], valid, ids, local_root=location.local_path)
    except StoreError as exc:
        problems.append(str(exc))
    else:
        if bad:
            problems.append(
                f"non-finite features (NaN/Inf) in {len(bad)} valid rows: ids {name_ids(bad)}"
            )
    summary |= {
        "n_valid": int(valid.sum()),
        "n_skipped": int((~valid).sum()),
        "chunks_done": int(arrays["progress"].shape[0] - not_done.size),
        "split_counts": {s: int(((split == s) & valid).sum()) for s in SPLITS},
    }
    return problems, summary


def verify_store(url: str, *, storage_options: dict | None = None) -> VerifyReport:
    """Check a store's integrity; never raises for a damaged store (problems say what is wrong)."""
    location = resolve(url, storage_options)
    try:
        group = open_group(location, mode="r")
        problems, summary = collect_problems(group, location, require_complete=True)
    except StoreInputError as exc:
        problems, summary = [str(exc)], {}
    except Exception as exc:  # unreadable metadata or chunks
        logger.debug("verify of %s failed", url, exc_info=True)
        problems, summary = [f"store unreadable: {type(exc).__name__}: {exc}"], {}
    summary["url"] = location.url
    return VerifyReport(ok=not problems, problems=problems, summary=summary)
