"""Cached features for head training: in memory as device tensors, or streamed in chunks.

Batches are tensor slices of a permuted index (no per-sample DataLoader over cached features).
A `FeatureSet` holds named splits (``train``, ``val``, ``test``...), each ``X (N, D) float32`` and
``y (N,) int64`` on one device; a split may instead be a `StreamingFeatures` (chunks read from an
iterator factory, prefetched on a background thread) when it does not fit in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import InputError
from stores.prefetch import prefetch

logger = logging.getLogger(__name__)


class FeatureStoreLike(Protocol):
    """The duck-typed store-reader surface `FeatureSet.from_store` uses."""

    class_names: Sequence[str]

    def features(self, split: str) -> np.ndarray: ...  # (n, D) float32
    def labels(self, split: str) -> np.ndarray: ...  # (n,) int64
    def ids(self, split: str) -> list[str]: ...
    def splits(self) -> Sequence[str]: ...
    def nbytes(self) -> int: ...  # features as stored (any dtype)

    # for streaming: store rows ``start:stop`` of a split, chunk-aligned blocks
    n: int
    chunk_rows: int
    dtype: str

    def read_rows(self, split: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Split:
    """One in-memory split: ``X (N, D) float32``, ``y (N,) int64``, optional row ids."""

    X: torch.Tensor
    y: torch.Tensor
    ids: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _as_split(
    X: Any, y: Any, ids: Sequence[str] | None, *, name: str, device: torch.device
) -> Split:
    X_np = np.asarray(X)
    y_np = np.asarray(y)
    if X_np.ndim != 2:
        raise InputError(f"features of split {name!r} must be 2-D (N, D), got shape {X_np.shape}")
    if y_np.shape != (X_np.shape[0],):
        raise InputError(
            f"labels of split {name!r} must have shape ({X_np.shape[0]},), got {y_np.shape}; "
            "give one integer label per feature row"
        )
    if not np.issubdtype(y_np.dtype, np.integer):
        raise InputError(f"labels of split {name!r} must be integers, got dtype {y_np.dtype}")
    if ids is not None and len(ids) != X_np.shape[0]:
        raise InputError(f"split {name!r} has {X_np.shape[0]} rows but {len(ids)} ids")
    Xt = torch.as_tensor(np.ascontiguousarray(X_np, dtype=np.float32))
    if not torch.isfinite(Xt).all():
        raise InputError(f"features of split {name!r} contain NaN or inf; re-extract the store")
    yt = torch.as_tensor(y_np.astype(np.int64, copy=False))
    return Split(X=Xt.to(device), y=yt.to(device), ids=tuple(str(i) for i in ids) if ids else None)


BlockReader = Callable[[int], tuple[np.ndarray, np.ndarray]]
"""Block index → ``(X (n, D), y (n,))``: one contiguous, chunk-aligned piece of a split."""


class StreamingFeatures:
    """A split too large for memory, read in blocks ``read_block(i)``, ``i < n_blocks``.

    Each epoch visits the blocks in a random order (``generator``), ``buffer_blocks`` at a time:
    they are read ahead on a background thread, concatenated into a shuffle buffer whose rows
    are permuted, and cut into batches (a short tail is carried into the next buffer). So a
    store sorted by class — ids sort by class folder — still gives batches that mix rows from
    ``buffer_blocks`` random places of the whole split, and every row is used once per epoch.
    ``num_rows`` (rows per epoch) lets the trainer size its schedule.
    """

    def __init__(
        self,
        read_block: BlockReader,
        *,
        n_blocks: int,
        num_rows: int,
        dim: int,
        buffer_blocks: int = 8,
        prefetch: int = 2,
    ) -> None:
        if prefetch < 1 or buffer_blocks < 1 or n_blocks < 1:
            raise InputError(
                f"prefetch, buffer_blocks and n_blocks must be >= 1, got {prefetch}, "
                f"{buffer_blocks}, {n_blocks}"
            )
        self.read_block = read_block
        self.n_blocks = int(n_blocks)
        self.num_rows = int(num_rows)
        self.dim = int(dim)
        self.buffer_blocks = min(int(buffer_blocks), self.n_blocks)
        self.prefetch = int(prefetch)

    @classmethod
    def from_arrays(
        cls, X: np.ndarray, y: np.ndarray, *, block_rows: int, **kwargs: Any
    ) -> StreamingFeatures:
        """Stream in-memory arrays in blocks of ``block_rows`` rows (tests, benchmarks)."""
        n = len(y)

        def read(i: int) -> tuple[np.ndarray, np.ndarray]:
            return X[i * block_rows : (i + 1) * block_rows], y[
                i * block_rows : (i + 1) * block_rows
            ]

        return cls(read, n_blocks=max(1, -(-n // block_rows)), num_rows=n, dim=X.shape[1], **kwargs)

    def __len__(self) -> int:
        return self.num_rows

    def _tensors(self, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self.read_block(int(i))
        Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32))
        yt = torch.as_tensor(np.asarray(y).astype(np.int64, copy=False))
        if Xt.ndim != 2 or Xt.shape[1] != self.dim or yt.shape != (Xt.shape[0],):
            raise InputError(
                f"streamed block {i} has X {tuple(Xt.shape)}, y {tuple(yt.shape)}; "
                f"expected (n, {self.dim}) and (n,)"
            )
        if device.type == "cuda":
            Xt, yt = Xt.pin_memory(), yt.pin_memory()
        return Xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)

    def chunks(
        self, device: torch.device, order: Sequence[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield blocks ``(X (n, D) float32, y (n,) int64)`` on ``device`` in ``order`` (store
        order by default), read ahead on a background thread."""
        order = range(self.n_blocks) if order is None else order
        return prefetch((self._tensors(i, device) for i in order), depth=self.prefetch)

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None,
        device: torch.device,
        shuffle: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(X (b, D), y (b,))`` batches; only the epoch's last batch may be short."""
        order = None  # one block: no order to draw (an in-memory split's batches exactly)
        if shuffle and self.n_blocks > 1:
            order = torch.randperm(self.n_blocks, generator=generator).tolist()
        blocks = self.chunks(device, order)
        carry: tuple[torch.Tensor, torch.Tensor] | None = None
        while True:
            group = list(itertools.islice(blocks, self.buffer_blocks))
            if not group:
                break
            if carry is not None:
                group.insert(0, carry)
            X = torch.cat([g[0] for g in group])
            y = torch.cat([g[1] for g in group])
            if shuffle:
                perm = torch.randperm(len(y), generator=generator).to(device)
                X, y = X[perm], y[perm]
            full = (len(y) // batch_size) * batch_size
            for start in range(0, full, batch_size):
                yield X[start : start + batch_size], y[start : start + batch_size]
            carry = (X[full:], y[full:]) if full < len(y) else None
        if carry is not None:
            yield carry

    def sample(
        self, max_rows: int, *, generator: torch.Generator | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of randomly chosen whole blocks, up to about ``max_rows`` (at least one block)."""
        order = torch.randperm(self.n_blocks, generator=generator).tolist()
        xs, ys, n = [], [], 0
        for X, y in self.chunks(device, order):
            xs.append(X)
            ys.append(y)
            n += len(y)
            if n >= max_rows:
                break
        return torch.cat(xs)[:max_rows], torch.cat(ys)[:max_rows]


@dataclass
class FeatureSet:
    """Named splits of cached features on one device, plus class names.

    ``splits`` hold in-memory `Split`s; ``streams`` hold splits streamed from disk (usually only
    ``train`` when it does not fit). A split name is in one of the two, never both.
    """

    splits: dict[str, Split]
    class_names: tuple[str, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    streams: dict[str, StreamingFeatures] = field(default_factory=dict)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(
        cls,
        splits: Mapping[str, tuple[Any, Any]],
        *,
        class_names: Sequence[str] | None = None,
        ids: Mapping[str, Sequence[str]] | None = None,
        device: str | torch.device = "cpu",
    ) -> FeatureSet:
        """Build from ``{split: (X (N, D), y (N,))}`` NumPy arrays (or tensors)."""
        dev = torch.device(device)
        out = {
            name: _as_split(X, y, (ids or {}).get(name), name=name, device=dev)
            for name, (X, y) in splits.items()
        }
        return cls._checked(out, class_names, dev)

    @classmethod
    def from_store(
        cls,
        store: FeatureStoreLike,
        *,
        device: str | torch.device = "cpu",
        max_bytes: int | None = None,
        block_rows: int | None = None,
        prefetch: int = 2,
    ) -> FeatureSet:
        """Load a store's splits; stream ``train`` when the features as float32 exceed
        ``max_bytes`` (default: half the free device memory on CUDA, half the available RAM —
        page cache counted as available — on a CPU). A streamed split is read in blocks of
        ``block_rows`` store rows (default: whole store chunks, about `BLOCK_BYTES` each)."""
        dev = torch.device(device)
        budget = memory_budget(dev) if max_bytes is None else int(max_bytes)
        names = list(store.splits())
        itemsize = np.dtype(getattr(store, "dtype", "float32")).itemsize
        stream = store.nbytes() * 4 // itemsize > budget and "train" in names
        splits: dict[str, Split] = {}
        streams: dict[str, StreamingFeatures] = {}
        for name in names:
            if stream and name == "train":
                streams[name] = _store_stream(
                    store, name, budget=budget, block_rows=block_rows, prefetch=prefetch
                )
                logger.info("streaming split %r (%d rows) in blocks", name, len(streams[name]))
                continue
            splits[name] = _as_split(
                store.features(name), store.labels(name), store.ids(name), name=name, device=dev
            )
        fs = cls._checked(splits, list(store.class_names), dev)
        fs.streams = streams
        return fs

    @classmethod
    def _checked(
        cls, splits: dict[str, Split], class_names: Sequence[str] | None, device: torch.device
    ) -> FeatureSet:
        if not splits:
            raise InputError("no feature splits given; need at least 'train'")
        dims = {s.X.shape[1] for s in splits.values()}
        if len(dims) != 1:
            raise InputError(f"splits have different feature widths {sorted(dims)}")
        max_label = max(int(s.y.max()) if len(s) else -1 for s in splits.values())
        min_label = min(int(s.y.min()) if len(s) else 0 for s in splits.values())
        if min_label < 0:
            raise InputError(f"labels must be >= 0, found {min_label}")
        if class_names is None:
            class_names = [str(i) for i in range(max_label + 1)]
        if max_label >= len(class_names):
            raise InputError(
                f"label {max_label} found but only {len(class_names)} class names given"
            )
        return cls(splits=splits, class_names=tuple(class_names), device=device)

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Feature width D."""
        if self.splits:
            return int(next(iter(self.splits.values())).X.shape[1])
        return next(iter(self.streams.values())).dim

    @property
    def num_classes(self) -> int:
        """Number of classes C (``len(class_names)``)."""
        return len(self.class_names)

    def has(self, split: str) -> bool:
        """Whether the split exists (in memory or streamed)."""
        return split in self.splits or split in self.streams

    def num_rows(self, split: str) -> int:
        """Rows in a split."""
        if split in self.splits:
            return len(self.splits[split])
        if split in self.streams:
            return len(self.streams[split])
        raise InputError(f"split {split!r} not found; have {sorted(self.names())}")

    def names(self) -> list[str]:
        """All split names."""
        return [*self.splits, *self.streams]

    def get(self, split: str) -> Split:
        """The in-memory split (raises for a missing or streamed split)."""
        if split not in self.splits:
            where = "is streamed" if split in self.streams else "does not exist"
            raise InputError(
                f"split {split!r} {where}; have in memory: {sorted(self.splits)}; "
                "give a validation/test split small enough to hold in memory"
            )
        return self.splits[split]

    # ------------------------------------------------------------------ batches
    def batches(
        self,
        split: str,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        shuffle: bool = True,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(X (b, D) float32, y (b,) int64)`` slices of one permutation per epoch.

        In memory: one ``torch.randperm(N, generator=generator)`` per call (on the CPU, so the
        order is the same on every device), then contiguous slices of the permuted index.
        """
        if split in self.streams:
            yield from self.streams[split].batches(
                batch_size, generator=generator, device=self.device, shuffle=shuffle
            )
            return
        s = self.get(split)
        n = len(s)
        if shuffle:
            perm = torch.randperm(n, generator=generator).to(self.device)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                yield s.X[idx], s.y[idx]
        else:
            for start in range(0, n, batch_size):
                yield s.X[start : start + batch_size], s.y[start : start + batch_size]

    def fit_sample(self, split: str = "train", *, max_per_class: int = 512, seed: int = 0):
        """Up to ``max_per_class`` rows per class of a split: ``(X (n, D), y (n,))`` tensors.

        For class statistics (ISDA, DC). In memory: a seeded subsample; streamed: the first
        rows of each class in one pass.
        """
        if split in self.splits:
            s = self.splits[split]
            idx = per_class_subsample(s.y.cpu().numpy(), max_per_class, seed=seed)
            t = torch.as_tensor(idx, device=self.device)
            return s.X[t], s.y[t]
        counts = np.zeros(self.num_classes, dtype=np.int64)
        xs, ys = [], []
        for X, y in self.streams[split].chunks(self.device):
            y_np = y.cpu().numpy()
            order = np.argsort(y_np, kind="stable")
            y_sorted = y_np[order]
            rank = np.arange(len(order)) - np.searchsorted(y_sorted, y_sorted, side="left")
            keep = np.zeros(len(y_np), dtype=bool)
            keep[order[rank < max_per_class - counts[y_sorted]]] = True  # first rows per class
            counts += np.bincount(y_np[keep], minlength=self.num_classes)
            if keep.any():
                k = torch.as_tensor(np.flatnonzero(keep), device=self.device)
                xs.append(X[k])
                ys.append(y[k])
            if (counts >= max_per_class).all():
                break
        return torch.cat(xs), torch.cat(ys)

    # ------------------------------------------------------------------ derived sets
    def subset(self, rows: Mapping[str, np.ndarray], *, source: str | None = None) -> FeatureSet:
        """A new in-memory set whose split ``name`` is rows ``rows[name]`` of split ``source``
        (or of the split of the same name when ``source`` is None)."""
        out: dict[str, Split] = {}
        for name, idx in rows.items():
            s = self.get(source or name)
            t = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
            ids = tuple(s.ids[i] for i in np.asarray(idx)) if s.ids else None
            out[name] = Split(X=s.X[t], y=s.y[t], ids=ids)
        return FeatureSet(splits=out, class_names=self.class_names, device=self.device)

    def with_validation(self, *, fraction: float = 0.1, seed: int = 0) -> FeatureSet:
        """If there is no ``val`` split, carve a class-balanced one out of ``train``.

        Every class gives the same number of rows, ``max(1, floor(fraction * min_count))``,
        and keeps at least one training row. Other splits are kept as they are.
        """
        if self.has("val"):
            return self
        train = self.get("train")
        tr_idx, val_idx = balanced_holdout(train.y.cpu().numpy(), fraction=fraction, seed=seed)
        carved = self.subset({"train": tr_idx, "val": val_idx}, source="train")
        for name, s in self.splits.items():
            if name != "train":
                carved.splits[name] = s
        return carved


def per_class_subsample(y: np.ndarray, max_per_class: int, *, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_per_class`` rows per class, chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) > max_per_class:
            idx = rng.choice(idx, size=max_per_class, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def balanced_holdout(y: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, val) with the same val count for every class."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"validation fraction must be in (0, 1), got {fraction}")
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < 2:
        bad = classes[counts < 2].tolist()
        raise InputError(
            f"classes {bad[:10]} have fewer than 2 training rows; cannot carve a validation "
            "split: give a 'val' split explicitly"
        )
    per_class = max(1, int(np.floor(fraction * counts.min())))
    rng = np.random.default_rng(seed)
    val = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        val.append(rng.choice(idx, size=per_class, replace=False))
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


BLOCK_BYTES = 4 << 20  # a streamed block: whole store chunks, about 4 MB as float32
BUFFER_FRACTION = 8  # the streaming shuffle buffer takes at most 1/8 of the memory budget
MAX_BUFFER_BYTES = 1 << 30


def _store_stream(
    store: FeatureStoreLike, split: str, *, budget: int, block_rows: int | None, prefetch: int
) -> StreamingFeatures:
    """Stream ``split`` of ``store`` in blocks of whole store chunks, shuffled across the store."""
    labels = np.asarray(store.labels(split))
    dim = int(store.dim)
    if block_rows is None:
        chunk = int(store.chunk_rows)
        block_rows = chunk * max(1, BLOCK_BYTES // max(1, chunk * dim * 4))
    n_blocks = max(1, -(-int(store.n) // block_rows))
    block_bytes = block_rows * dim * 4
    buffer_bytes = min(MAX_BUFFER_BYTES, max(block_bytes, budget // BUFFER_FRACTION))
    buffer_blocks = max(2, buffer_bytes // block_bytes)

    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        return store.read_rows(split, i * block_rows, (i + 1) * block_rows)

    return StreamingFeatures(
        read,
        n_blocks=n_blocks,
        num_rows=len(labels),
        dim=dim,
        buffer_blocks=buffer_blocks,
        prefetch=prefetch,
    )


def _available_ram() -> int | None:
    """Bytes of RAM available to a new allocation (``MemAvailable``: free plus reclaimable page
    cache), or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_budget(device: torch.device) -> int:
    """Bytes of features we allow in memory: half the free CUDA memory, or half the available
    RAM (page cache included: a store just written sits there and is cheap to evict)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free // 2)
    avail = _available_ram()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 2**62
    return int(avail // 2)
