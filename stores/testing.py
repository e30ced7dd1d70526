"""Small, deterministic synthetic stores for tests (real Zarr stores with generated features).

Used by this package's tests and by others that need a store without running a backbone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stores.identity import StoreIdentity
from stores.writer import StoreWriter, open_writer


@dataclass(frozen=True)
class SyntheticData:
    """Generated rows: ``features`` (N, D) or (N, 1+V, D) float32, the rest (N,)."""

    ids: list[str]
    labels: np.ndarray  # (N,) int64
    split: list[str]
    class_names: list[str]
    features: np.ndarray  # (N, D) | (N, 1+V, D) float32
    valid: np.ndarray  # (N,) bool
    errors: list[str]  # "" for valid rows


def synthetic_data(
    n: int, *, dim: int = 8, views: int = 0, n_classes: int = 3, skip_every: int = 0, seed: int = 0
) -> SyntheticData:
    """N rows of class-dependent Gaussian features; every ``skip_every``-th row invalid (0: none)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n).astype(np.int64)
    shape = (n, dim) if views == 0 else (n, 1 + views, dim)
    centers = rng.standard_normal((n_classes, dim)).astype(np.float32) * 3
    feats = rng.standard_normal(shape).astype(np.float32)
    feats += centers[labels][:, None, :] if views else centers[labels]
    valid = np.ones(n, bool)
    if skip_every:
        valid[::skip_every] = False
    return SyntheticData(
        ids=[f"class{int(y)}/img{i:06d}.png" for i, y in enumerate(labels)],
        labels=labels,
        split=rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]).tolist(),
        class_names=[f"class{c}" for c in range(n_classes)],
        features=feats,
        valid=valid,
        errors=["" if v else "cannot identify image file" for v in valid],
    )


def synthetic_identity(data: SyntheticData, **changes: Any) -> StoreIdentity:
    """An identity for ``data`` (random-init test backbone); ``changes`` replace fields."""
    views = 0 if data.features.ndim == 2 else data.features.shape[1] - 1
    identity = StoreIdentity(
        dataset="synthetic",
        backbone="test_vit",
        weights={"kind": "random", "seed": 0},
        data_config={
            "input_size": (3, 160, 160),
            "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
        views=views,
        dtype="float16",
        versions={"timm": "test", "torch": "test"},
        input_fingerprint=_rows_digest(data),
    )
    return replace(identity, **changes)


def _rows_digest(data: SyntheticData) -> str:
    """sha256 hex over every row's id, label and split (synthetic rows have no files)."""
    h = hashlib.sha256(b"carrot-synthetic-rows-v1")
    for row in zip(data.ids, data.labels.tolist(), data.split, strict=True):
        h.update(repr(row).encode())
    return h.hexdigest()


def open_synthetic_writer(
    url: str, data: SyntheticData, identity: StoreIdentity, **kwargs: Any
) -> StoreWriter:
    """:func:`open_writer` for ``data`` (``kwargs``: chunk_rows, compressor, lock, ...)."""
    return open_writer(
        url,
        identity,
        ids=data.ids,
        labels=data.labels,
        split=data.split,
        class_names=data.class_names,
        dim=data.features.shape[-1],
        **kwargs,
    )


def write_chunks(
    writer: StoreWriter,
    data: SyntheticData,
    chunks: Iterable[int] | None = None,
    *,
    delay_s: float = 0.0,
) -> None:
    """Write ``chunks`` (default: all pending) of ``data``, sleeping ``delay_s`` before each."""
    for i in writer.pending_chunks() if chunks is None else chunks:
        rows = writer.chunk_rows_range(i)
        sl = slice(rows.start, rows.stop)
        if delay_s:
            time.sleep(delay_s)
        writer.write_chunk(i, data.features[sl], valid=data.valid[sl], errors=data.errors[sl])


def write_synthetic_store(
    url: str, data: SyntheticData, identity: StoreIdentity, **kwargs: Any
) -> str:
    """Write and finalize a whole store of ``data`` at ``url``; returns ``url``."""
    with open_synthetic_writer(url, data, identity, **kwargs) as writer:
        write_chunks(writer, data)
        writer.finalize(timings={"write_s": 0.0})
    return url


def edit_attrs(url: str, **changes: Any) -> None:
    """Change group attributes of a local store in its ``zarr.json`` directly (as a user's or a
    tool's edit would), bypassing every writer check — for tests of damaged stores."""
    import json
    from pathlib import Path

    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"] |= changes
    meta.write_text(json.dumps(doc))
