"""Integrity checks of a store: ``verify_store(url)`` → :class:`VerifyReport`.

Checked: the schema version and attributes, every array present and readable with consistent
shapes and dtypes, all progress flags, the ``complete`` marker, a file of the right size for every
written chunk of every row array (:mod:`stores.integrity`), the content key recomputed from the
stored identity (against the ``key`` attribute and the folder name's key prefix), labels in range
of ``class_names``, split values, the ``skipped`` list against ``valid``, and finite features in
valid rows (read block by block, never the whole array at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.errors import StoreCorruptError, StoreError, StoreInputError
from stores.identity import SCHEMA_VERSION, StoreIdentity
from stores.integrity import attr_problems, chunk_damage, layout_problems, open_arrays
from stores.location import StoreLocation, key_prefix_of, open_group, resolve
from stores.rowread import RowReader, read_all
from stores.schema import SPLITS

if TYPE_CHECKING:
    import zarr

logger = logging.getLogger(__name__)

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
    """Ids of valid rows holding NaN or Inf, read block by block (lost chunks read as zeros:
    :func:`stores.integrity.chunk_damage` reports them)."""
    reader = RowReader(features, local_root=local_root)
    bad: list[str] = []
    for start, block in reader.blocks(0, reader.shape[0]):
        stop = start + len(block)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        rows = np.flatnonzero(valid[start:stop] & ~finite) + start
        bad.extend(ids[rows].tolist())
    return bad


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


def _row_problems(
    attrs: dict[str, Any], arrays: dict[str, zarr.Array], location: StoreLocation, *, scan: bool
) -> tuple[list[str], dict[str, Any]]:
    """Labels, splits, the skipped list and (with ``scan``) finite features; and counts."""
    problems = []
    ids, labels, split, valid = (
        read_all(arrays[name], url=location.url) for name in ("ids", "labels", "split", "valid")
    )
    valid = valid.astype(bool)
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
        listed = [s.get("id") if isinstance(s, dict) else s for s in attrs.get("skipped", [])]
        if sorted(map(str, listed)) != sorted(ids[~valid].tolist()):
            problems.append("skipped attribute does not list exactly the rows with valid=False")
    if scan:
        try:
            bad = nonfinite_ids(arrays["features"], valid, ids, local_root=location.local_path)
        except StoreError as exc:
            problems.append(str(exc))
        else:
            if bad:
                problems.append(
                    f"non-finite features (NaN/Inf) in {len(bad)} valid rows: ids {name_ids(bad)}"
                )
    counts = {
        "n_valid": int(valid.sum()),
        "n_skipped": int((~valid).sum()),
        "split_counts": {s: int(((split == s) & valid).sum()) for s in SPLITS},
    }
    return problems, counts


def collect_problems(
    group: zarr.Group, location: StoreLocation, *, require_complete: bool = True
) -> tuple[list[str], dict[str, Any]]:
    """All problems of an opened store group, and a summary. Reads features block by block."""
    attrs = group.attrs.asdict()
    bad_attrs = attr_problems(attrs)
    if bad_attrs:
        return bad_attrs, {}
    summary = {k: attrs[k] for k in ("key", "n", "dim", "views", "dtype", "complete")}
    problems = []
    if attrs["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {attrs['schema_version']} != supported {SCHEMA_VERSION}")
    if require_complete and attrs["complete"] is not True:
        problems.append("complete marker is not set (the writer did not finish)")
    arrays, bad_arrays = open_arrays(group, location)
    if bad_arrays:
        return [*problems, *bad_arrays], summary
    problems += _check_identity(attrs, location.url)
    layout = layout_problems(attrs, arrays)
    if layout:
        return [*problems, *layout], summary

    written = read_all(arrays["progress"], url=location.url).astype(bool)
    not_done = np.flatnonzero(~written)
    if not_done.size:
        problems.append(
            f"{not_done.size} chunks not written (progress flags unset): {not_done[:MAX_NAMED].tolist()}"
        )
    chunk_problems, damaged = chunk_damage(location, arrays, attrs, written)
    problems += chunk_problems
    rows, counts = _row_problems(attrs, arrays, location, scan="features" not in damaged)
    problems += rows
    summary |= counts | {"chunks_done": int(written.sum())}
    return problems, summary


def verify_store(url: str, *, storage_options: dict | None = None) -> VerifyReport:
    """Check a store's integrity; never raises for a damaged store (problems say what is wrong)."""
    location = resolve(url, storage_options)
    try:
        group = open_group(location, mode="r")
        problems, summary = collect_problems(group, location, require_complete=True)
    except StoreCorruptError as exc:
        problems, summary = list(exc.problems), {}
    except StoreInputError as exc:
        problems, summary = [str(exc)], {}
    except Exception as exc:  # unreadable chunks (e.g. garbled compressed data)
        logger.debug("verify of %s failed", url, exc_info=True)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        problems, summary = [f"store unreadable: {detail}"], {}
    summary["url"] = location.url
    return VerifyReport(ok=not problems, problems=problems, summary=summary)
