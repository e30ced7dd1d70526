"""Image data sources: resolve a DATA spec into a picklable, deterministic list of images.

DATA is one of (detected in this order):

- ``sklearn:digits`` — scikit-learn's 1 797 real 8×8 digit images, upscaled to 32×32 RGB.
- a ``.csv`` manifest — rows ``path,label[,split]`` (optional header naming the columns), UTF-8;
  paths relative to the CSV's folder (paths outside it are refused unless
  ``allow_outside_paths``); labels are class names.
- a CUB-200-2011 root (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``classes.txt``, ``images/``) or a NABirds root (the same plus ``hierarchy.txt``).
- an ImageFolder — one sub-folder per class, optionally below ``train/``, ``val/``, ``test/``.

Splits the source does not give are carved by :mod:`pipeline.embed.splits` (stratified, seeded).
Records are sorted by id.

One file, one record: a file reached under several names is listed once or refused, so it can
never land in two splits. Folders are walked following symlinks, but a folder symlink that loops
back to a folder above it (``ln -s . loop``) is skipped with a warning, and a folder reached twice
is walked once. A file reached twice through symlinks with the same class and split is kept once
(the path without symlinks, else the first id; a warning says how many); with different classes
or splits it is an :class:`InputError`, as is a CSV or ``images.txt`` listing one file (by real
path) on two rows. An :class:`ImageSource` holds plain data only (it is pickled to
DataLoader and Dask workers); files are opened when :meth:`ImageSource.load` is called.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pipeline.embed.images import IMG_EXTENSIONS, ImageLoadError, is_image_file, load_rgb
from pipeline.embed.splits import SPLITS, assign_splits, check_fractions
from pipeline.errors import InputError
from pipeline.terminal import one_line

__all__ = [
    "FINGERPRINT_MODES",
    "SKLEARN_DATASETS",
    "ImageLoadError",  # re-exported: ImageSource.load raises it
    "ImageRecord",
    "ImageSource",
    "check_fingerprint_mode",
    "resolve_source",
]

logger = logging.getLogger(__name__)

SKLEARN_DATASETS: tuple[str, ...] = ("digits",)
_DIGITS_SIZE = 32  # 8×8 digits are upscaled (nearest) to this many pixels per side
_SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
_CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
_KINDS = ("folder", "cub", "nabirds", "csv", "sklearn")
FINGERPRINT_MODES: tuple[str, ...] = ("stat", "content")
"""How :meth:`ImageSource.fingerprint` sees files: size + mtime, or a hash of every byte."""
_HASH_BLOCK = 1 << 20  # bytes per read when hashing file contents
_HASH_BATCH = 1024  # files handed to the thread pool at a time (bounds pending futures)


def check_fingerprint_mode(mode: str) -> None:
    """Raise InputError unless ``mode`` is one of :data:`FINGERPRINT_MODES`."""
    if mode not in FINGERPRINT_MODES:
        raise InputError(
            f"unknown fingerprint mode {mode!r}; use one of {', '.join(FINGERPRINT_MODES)}"
        )


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source."""

    id: str  # source-relative path (digits: "digits/00042"); unique within the source
    label: int  # index into ImageSource.class_names
    split: str  # "train" | "val" | "test"


@dataclass(frozen=True)
class ImageSource:
    """A resolved data set: class names and records, sorted by id. Picklable plain data."""

    name: str  # data set name for store paths: "digits", folder basename, "cub200", ...
    kind: str  # "folder" | "cub" | "nabirds" | "csv" | "sklearn"
    location: str  # the DATA spec the user gave
    class_names: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    root: str = ""  # absolute folder the record ids are relative to ("" for sklearn)
    val_fraction: float = 0.1  # split settings, part of the fingerprint
    test_fraction: float = 0.2
    seed: int = 0
    outside_paths: bool = False  # a manifest's allowed outside paths: root is their common folder

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class index per record."""
        return np.fromiter((r.label for r in self.records), dtype=np.int64, count=len(self))

    def indices(self, split: str) -> np.ndarray:
        """(n,) int64 sorted row indices of the records in ``split``."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return np.array([i for i, r in enumerate(self.records) if r.split == split], np.int64)

    def path(self, i: int) -> str | None:
        """Absolute file path of record ``i`` (None for in-memory data sets)."""
        if self.kind == "sklearn":
            return None
        return os.path.join(self.root, self.records[i].id)

    def load(self, i: int) -> Image.Image:
        """Decode record ``i`` as an 8-bit RGB image.

        Raises:
            ImageLoadError: the file is missing, unreadable or corrupt (carries the record id).
        """
        record = self.records[i]
        if self.kind == "sklearn":
            pixels = _sklearn_pixels(self.name)[_sklearn_index(record.id)]  # (S, S) uint8
            return Image.fromarray(pixels).convert("RGB")
        return load_rgb(os.path.join(self.root, record.id), image_id=record.id)

    def fingerprint(self, mode: str = "stat", *, workers: int | None = None) -> str:
        """sha256 hex of what the store's features depend on; the input part of the content key.

        Always covered: kind, class names, split settings and, per record, id, label and split.
        Per file, ``mode="stat"`` (default, cheap) adds its size and mtime (ns) — an edit that
        keeps the size and restores the mtime is not seen; ``mode="content"`` adds the sha256 of
        its bytes instead (every file is read, by ``workers`` threads, default ``min(8, cpus)``;
        touching a file does not change it). A missing file counts as missing in either mode.
        For files the two modes never give the same value; in-memory sets hash their pixels, the
        same value in both modes (the store key still differs: ``plan_embedding`` records
        ``fingerprint: "content"`` in the identity).
        """
        check_fingerprint_mode(mode)
        if self.kind == "sklearn":
            pixels = _sklearn_pixels(self.name)
            per_file = [
                (hashlib.sha256(pixels[_sklearn_index(r.id)].tobytes()).hexdigest(),)
                for r in self.records
            ]
            return self._digest(("carrot-source-v1",), per_file)
        paths = [self.path(i) or "" for i in range(len(self))]
        if mode == "stat":
            return self._digest(("carrot-source-v1",), [_size_mtime(p) for p in paths])
        # Hash once per process for unchanged files: the CLI checks the input, then the flow
        # plans again. Any write or os.utime moves a file's ctime, so a change misses the memo;
        # files changed in the last seconds (ctime ticks are coarse) are never memoized.
        stats = [_strong_stat(p) for p in paths]
        probe = self._digest(("carrot-stat-probe",), stats)
        with _CONTENT_MEMO_LOCK:
            if probe in _CONTENT_MEMO:
                return _CONTENT_MEMO[probe]
        settled = max((st[-1] for st in stats), default=0) < time.time_ns() - _SETTLED_NS
        digest = self._digest(("carrot-source-v1", "content"), _content_hashes(paths, workers))
        if settled:
            with _CONTENT_MEMO_LOCK:
                _CONTENT_MEMO[probe] = digest
                while len(_CONTENT_MEMO) > 8:
                    _CONTENT_MEMO.popitem(last=False)
        return digest

    def _digest(self, head: tuple[str, ...], per_file: Sequence[tuple[object, ...]]) -> str:
        """sha256 over ``head``, kind, classes, split settings and per record (id, *per_file[i]),
        (label, split). With ``head=("carrot-source-v1",)`` and (size, mtime) per file this is
        the stat fingerprint every existing store was keyed with: keep it byte for byte."""
        h = hashlib.sha256()

        def feed(*parts: object) -> None:
            for p in parts:
                h.update(str(p).encode())
                h.update(b"\x1f")
            h.update(b"\x1e")

        feed(*head, self.kind, *self.class_names)
        feed(self.val_fraction, self.test_fraction, self.seed)
        for r, extra in zip(self.records, per_file, strict=True):
            feed(r.id, *extra)
            feed(r.label, r.split)
        return h.hexdigest()


_CONTENT_MEMO: OrderedDict[str, str] = OrderedDict()  # stat probe → content fingerprint
_SETTLED_NS = 2_000_000_000  # a file whose ctime is older than this is memoizable
_CONTENT_MEMO_LOCK = threading.Lock()


def _size_mtime(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _strong_stat(path: str) -> tuple[int, ...]:
    """(dev, inode, size, mtime ns, ctime ns) of ``path``; ctime last; (-1,) when missing."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1,)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _file_sha256(path: str) -> str:
    """sha256 hex of the file's bytes, read in 1 MiB blocks; a marker if it is missing,
    unreadable or not a regular file."""
    h = hashlib.sha256()
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not-a-regular-file"  # a FIFO would block the read forever
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)  # hashlib releases the GIL: threads hash in parallel
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unreadable"
    return h.hexdigest()


def _content_hashes(paths: Sequence[str], workers: int | None) -> list[tuple[str]]:
    """(sha256 hex,) of every file of ``paths``, in order, hashed by a thread pool."""
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r} must be a positive integer")
    out: list[tuple[str]] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="carrot-hash") as pool:
        for start in range(0, len(paths), _HASH_BATCH):
            batch = paths[start : start + _HASH_BATCH]
            out.extend((d,) for d in pool.map(_file_sha256, batch))
    return out


def resolve_source(
    spec: str,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    allow_outside_paths: bool = False,
) -> ImageSource:
    """Resolve DATA (see the module doc) into an :class:`ImageSource`.

    Args:
        spec: a folder, a CUB/NABirds root, a ``.csv`` manifest or ``sklearn:<name>``.
        val_fraction, test_fraction: fractions carved for splits the source does not give.
        seed: seed of the carving.
        allow_outside_paths: accept manifest (CSV, ``images.txt``) paths that are absolute or
            lead out of the manifest's folder. Then, if any does, ids are relative to the
            common folder of all images (``root``; ``outside_paths`` is True).

    Raises:
        InputError: anything wrong with the input, with what to do about it.
    """
    check_fractions(val_fraction, test_fraction)
    settings = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}
    spec = str(spec)
    if spec.lower().startswith("sklearn:"):
        return _sklearn_source(spec, **settings)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(
            f"DATA {spec!r} does not exist; give an image folder (one sub-folder per class), a "
            "CUB-200/NABirds root, a .csv manifest (path,label[,split]) or sklearn:digits"
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise InputError(
                f"DATA {spec!r} is a file but not a .csv manifest; give a folder, a CUB/NABirds "
                "root, a .csv manifest with rows path,label[,split], or sklearn:digits"
            )
        return _csv_source(spec, path, allow_outside_paths, **settings)
    present = [f for f in _CUB_FILES if (path / f).is_file()]
    if "images.txt" in present and len(present) > 1:
        return _cub_source(spec, path, present, allow_outside_paths, **settings)
    return _folder_source(spec, path, **settings)


# --------------------------------------------------------------------------- sklearn


@functools.lru_cache(maxsize=2)
def _sklearn_pixels(name: str) -> np.ndarray:
    """(N, S, S) uint8 gray pixels of a scikit-learn image data set, S = 32 (0..16 → 0..255)."""
    if name != "digits":
        raise InputError(f"unknown data set sklearn:{name}; available: sklearn:digits")
    from sklearn.datasets import load_digits

    images = load_digits().images  # (N, 8, 8) float64 in 0..16
    pix = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
    k = _DIGITS_SIZE // pix.shape[1]
    return np.ascontiguousarray(pix.repeat(k, axis=1).repeat(k, axis=2))  # nearest upscale


def _sklearn_index(image_id: str) -> int:
    return int(image_id.rsplit("/", 1)[1])


def _sklearn_source(spec: str, **settings) -> ImageSource:
    name = spec.split(":", 1)[1].strip().lower()
    if name not in SKLEARN_DATASETS:
        raise InputError(
            f"unknown data set {spec!r}; available: "
            + ", ".join(f"sklearn:{n}" for n in SKLEARN_DATASETS)
        )
    from sklearn.datasets import load_digits

    target = load_digits().target.astype(np.int64)
    class_names = tuple(str(c) for c in range(int(target.max()) + 1))
    ids = [f"{name}/{i:05d}" for i in range(len(target))]
    return _build(spec, name, "sklearn", "", class_names, ids, target.tolist(), None, **settings)


# --------------------------------------------------------------------------- CSV


def _decode_text(data: bytes, what: str) -> str:
    """``data`` as UTF-8 (a BOM is dropped); InputError naming ``what`` and the line if not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        hint = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise InputError(
            f"{what} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}){hint}; save it "
            "as UTF-8"
        ) from None


def _csv_rows(spec: str, path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows of the manifest as (line number, cells)."""
    what = f"CSV manifest {spec!r}"
    try:
        text = _decode_text(path.read_bytes(), what)
    except OSError as e:
        raise InputError(f"cannot read {what}: {one_line(e)}; check its permissions") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise InputError(
            f"{what} line {reader.line_num} cannot be parsed as CSV ({one_line(e)}); check "
            "its quotes and that it holds rows path,label[,split]"
        ) from None
    return rows


def _csv_source(spec: str, path: Path, allow_outside_paths: bool, **settings) -> ImageSource:
    rows = _csv_rows(spec, path)
    if not rows:
        raise InputError(f"CSV manifest {spec!r} is empty; add rows path,label[,split]")
    first = [c.strip().lower() for c in rows[0][1]]
    if "path" in first or "label" in first:
        missing = [c for c in ("path", "label") if c not in first]
        if missing:
            raise InputError(
                f"CSV manifest {spec!r} header {rows[0][1]} lacks column(s) {missing}; "
                "the header must name path,label[,split]"
            )
        cols = {c: first.index(c) for c in ("path", "label", "split") if c in first}
        rows = rows[1:]
    else:
        width = len(rows[0][1])
        if width not in (2, 3):
            raise InputError(
                f"CSV manifest {spec!r} line {rows[0][0]} has {width} column(s); expected "
                "path,label[,split] (or a header row naming those columns)"
            )
        cols = dict(zip(("path", "label", "split"), range(width), strict=False))
    width = max(cols.values()) + 1
    base = path.parent
    entries: list[tuple[int, str, str, str]] = []  # (line, path as given, label, split or "")
    for n, row in rows:
        if len(row) < width:
            raise InputError(
                f"CSV manifest {spec!r} line {n} has {len(row)} column(s), expected {width}: {row}"
            )
        p, label = row[cols["path"]].strip(), row[cols["label"]].strip()
        split = row[cols["split"]].strip().lower() if "split" in cols else ""
        if not p or not label:
            raise InputError(f"CSV manifest {spec!r} line {n} has an empty path or label")
        if split and split not in _SPLIT_ALIASES:
            raise InputError(
                f"CSV manifest {spec!r} line {n}: unknown split {split!r}; use train, val or test"
            )
        entries.append((n, p, label, _SPLIT_ALIASES.get(split, "")))
    if not entries:
        raise InputError(
            f"CSV manifest {spec!r} has a header but no rows; add rows path,label[,split]"
        )
    where = [f"CSV manifest {spec!r} line {e[0]}" for e in entries]
    given = [e[1] for e in entries]
    fulls, outside = _full_paths(where, given, base, allow_outside_paths, "the CSV's")
    root = os.path.commonpath([str(base), *fulls]) if outside else str(base)
    ids = [_rel_id(f, root) for f in fulls]
    missing = [g for g, f in zip(given, fulls, strict=True) if not os.path.isfile(f)]
    if missing:
        raise InputError(
            f"CSV manifest {spec!r}: {len(missing)} path(s) do not exist, e.g. {missing[:5]}; "
            f"paths are relative to the CSV's folder {str(base)!r}"
        )
    _refuse_same_file(f"CSV manifest {spec!r} lines", [str(e[0]) for e in entries], given, fulls)
    class_names = tuple(sorted({e[2] for e in entries}))
    index = {c: k for k, c in enumerate(class_names)}
    given_splits = [e[3] for e in entries]
    if any(given_splits) and not all(given_splits):
        raise InputError(
            f"CSV manifest {spec!r}: the split column is filled for some rows only; fill it for "
            "every row (train/val/test) or leave it out to have splits made for you"
        )
    splits = given_splits if all(given_splits) else None
    labels = [index[e[2]] for e in entries]
    name = _safe_name(path.stem)
    return _build(
        spec, name, "csv", root, class_names, ids, labels, splits, outside_paths=outside, **settings
    )


def _within(folder: str, path: str) -> bool:
    """True when normalized absolute ``path`` is ``folder`` or below it (lexically)."""
    return os.path.commonpath([folder, path]) == folder


def _full_paths(
    where: list[str], given: list[str], base: Path, allow_outside: bool, whose: str
) -> tuple[list[str], bool]:
    """Absolute normalized path of each manifest path (relative to ``base``, or absolute), and
    whether any is outside ``base``. One outside is an InputError naming ``where[i]`` and the
    path, unless ``allow_outside``. A path whose folder only resolves into ``base`` (a symlinked
    prefix) counts as inside; symlinked files below ``base`` may point anywhere."""
    folder = str(base)
    fulls, outside = [], False
    for w, g in zip(where, given, strict=True):
        if "\0" in g:
            raise InputError(f"{w}: path {g!r} holds a NUL byte, which no file name can")
        full = os.path.normpath(os.path.join(folder, g))
        if not _within(folder, full):
            real_dir = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
            if _within(folder, real_dir):
                full = real_dir
            elif not allow_outside:
                raise InputError(
                    f"{w}: path {g!r} is outside {whose} folder {folder!r}; paths are relative "
                    "to it: move the images below it, or pass --allow-outside-paths"
                )
            else:
                outside = True
        fulls.append(full)
    return fulls, outside


def _rel_id(full: str, root: str) -> str:
    return os.path.relpath(full, root).replace(os.sep, "/")


def _real_paths(fulls: list[str]) -> list[str]:
    """``os.path.realpath`` of each path, resolving each folder once (one lstat per file)."""
    dirs: dict[str, str] = {}
    out = []
    for f in fulls:
        d, name = os.path.split(f)
        if d not in dirs:
            dirs[d] = os.path.realpath(d)
        out.append(os.path.realpath(f) if os.path.islink(f) else os.path.join(dirs[d], name))
    return out


def _refuse_same_file(what: str, rows: list[str], given: list[str], fulls: list[str]) -> None:
    """InputError when two manifest rows (named ``rows``) list one file (same real path), under
    any spelling: ``what`` says where, e.g. "CSV manifest 'm.csv' lines"."""
    first: dict[str, int] = {}
    for i, real in enumerate(_real_paths(fulls)):
        if real in first:
            j = first[real]
            raise InputError(
                f"{what} {rows[j]} and {rows[i]} list the same file {real!r} "
                f"(as {given[j]!r} and {given[i]!r}); an image listed more than once could get "
                "two labels or splits: list each image once"
            )
        first[real] = i


# --------------------------------------------------------------------------- CUB / NABirds


def _read_table(path: Path, spec: str) -> list[tuple[str, str]]:
    """Lines ``key value...`` of a CUB/NABirds metadata file → (key, rest) pairs."""
    out = []
    text = _decode_text(path.read_bytes(), f"{path.name} of {spec!r}")
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise InputError(
                f"{path.name} of {spec!r} line {n} is malformed: {line!r}; expected 'id value'"
            )
        out.append((parts[0], parts[1].strip()))
    return out


def _cub_source(
    spec: str, root: Path, present: list[str], allow_outside_paths: bool, **settings
) -> ImageSource:
    missing = [f for f in _CUB_FILES if f not in present]
    if missing:
        raise InputError(
            f"DATA {spec!r} looks like a CUB-200/NABirds root but lacks {missing}; restore them "
            "from the original archive"
        )
    kind = "nabirds" if (root / "hierarchy.txt").is_file() else "cub"
    images = dict(_read_table(root / "images.txt", spec))
    labels = dict(_read_table(root / "image_class_labels.txt", spec))
    is_train = dict(_read_table(root / "train_test_split.txt", spec))
    classes = dict(_read_table(root / "classes.txt", spec))
    for fname, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        lost = [k for k in images if k not in table]
        if lost:
            raise InputError(
                f"{fname} of {spec!r} has no entry for {len(lost)} image id(s), e.g. {lost[:3]}; "
                "the metadata files must list the same image ids"
            )
    try:
        used = sorted({int(labels[k]) for k in images})
        flags = {k: int(is_train[k]) for k in images}
    except ValueError as e:
        raise InputError(f"non-integer class id or split flag in {spec!r}: {e}") from None
    unnamed = [c for c in used if str(c) not in classes]
    if unnamed:
        raise InputError(f"classes.txt of {spec!r} does not name class id(s) {unnamed[:5]}")
    if not images:
        raise InputError(f"images.txt of {spec!r} lists no images")
    class_names = tuple(classes[str(c)] for c in used)
    index = {c: k for k, c in enumerate(used)}
    keys = sorted(images, key=lambda k: images[k])
    ids = [images[k] for k in keys]
    if len(set(ids)) < len(ids):
        raise InputError(f"images.txt of {spec!r} lists an image path twice")
    image_root = root / "images"
    where = [f"images.txt of {spec!r} image id {k}" for k in keys]
    fulls, outside = _full_paths(where, ids, image_root, allow_outside_paths, "the images/")
    _refuse_same_file(f"images.txt of {spec!r} image ids", keys, ids, fulls)
    id_root = str(image_root)
    if outside:
        id_root = os.path.commonpath([id_root, *fulls])
        ids = [_rel_id(f, id_root) for f in fulls]
    label_list = [index[int(labels[k])] for k in keys]
    splits = ["train" if flags[k] == 1 else "test" for k in keys]
    name = "cub200" if kind == "cub" else "nabirds"
    return _build(
        spec,
        name,
        kind,
        id_root,
        class_names,
        ids,
        label_list,
        splits,
        outside_paths=outside,
        **settings,
    )


# --------------------------------------------------------------------------- ImageFolder


class _Found(NamedTuple):
    """An image file met while walking a folder source."""

    id: str  # path relative to the DATA root, posix
    cls: str  # class folder name
    split: str  # split folder's split, or ""
    real: str  # real path (symlinks resolved)
    direct: bool  # reached without passing through any symlink


def _folder_source(spec: str, root: Path, **settings) -> ImageSource:
    subdirs = _class_dirs(root, spec)
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_ALIASES]
    found: list[_Found] = []
    empty: list[str] = []  # class folders that hold no images
    if split_dirs:
        others = [d for d in subdirs if d not in split_dirs]
        if others:
            raise InputError(
                f"DATA {spec!r} mixes split folders {split_dirs} with other folders {others[:5]}; "
                "put every class folder under train/, val/ or test/, or use no split folders"
            )
        for sd in split_dirs:
            split = _SPLIT_ALIASES[sd.lower()]
            for cls in _class_dirs(root / sd, spec):
                images = _walk_images(root / sd / cls)
                empty += [] if images else [f"{sd}/{cls}"]
                found += [
                    _Found(f"{sd}/{cls}/{rel}", cls, split, real, direct)
                    for rel, real, direct in images
                ]
    else:
        for cls in subdirs:
            images = _walk_images(root / cls)
            empty += [] if images else [cls]
            found += [_Found(f"{cls}/{rel}", cls, "", real, direct) for rel, real, direct in images]
    if found and empty:  # a class the user made would silently not exist (ImageFolder refuses it)
        raise InputError(
            f"DATA {spec!r}: class folder(s) {empty[:5]} hold no images "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)"
        )
    stray = [f.name for f in root.iterdir() if f.is_file() and is_image_file(f.name)]
    if stray:
        logger.warning(
            "ignoring %d image(s) directly in %r (not in a class folder)", len(stray), str(root)
        )
    if not found:
        what = "is empty" if not any(root.iterdir()) else "has no class sub-folders with images"
        raise InputError(
            f"DATA {spec!r} {what}; an image folder needs one sub-folder per class holding "
            f"images ({', '.join(IMG_EXTENSIONS)}), optionally below train/, val/, test/"
        )
    entries = sorted(_one_per_file(found, spec))
    class_names = tuple(sorted({e.cls for e in entries}))
    index = {c: k for k, c in enumerate(class_names)}
    ids = [e.id for e in entries]
    labels = [index[e.cls] for e in entries]
    splits = [e.split for e in entries] if split_dirs else None
    return _build(
        spec,
        _safe_name(root.name),
        "folder",
        str(root),
        class_names,
        ids,
        labels,
        splits,
        **settings,
    )


def _is_above(folder: str, path: str) -> bool:
    """True when real path ``folder`` is ``path`` itself or one of its ancestors."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _class_dirs(folder: Path, spec: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``, without symlinks that loop
    back to ``folder`` or above it (skipped with a warning)."""
    real = os.path.realpath(folder)
    names = []
    for d in folder.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        if d.is_symlink() and _is_above(os.path.realpath(d), real):
            logger.warning(
                "DATA %r: not following folder symlink %r, it loops back to %r",
                spec,
                d.name,
                os.path.realpath(d),
            )
            continue
        names.append(d.name)
    return sorted(names)


def _walk_images(folder: Path) -> list[tuple[str, str, bool]]:
    """Image files below ``folder`` as sorted (posix path relative to ``folder``, real path,
    reached without symlinks) triples. Hidden entries are skipped.

    Each real folder is walked once: first the folders themselves, then the folder symlinks met
    (to anywhere). A folder symlink leading to a folder above it (a loop, ``ln -s . loop``) is
    skipped with a warning; one leading to a folder already walked is skipped (its images are
    listed once). File symlinks are followed; duplicates are left to :func:`_one_per_file`.
    """
    top = os.path.realpath(folder)
    seen = {top}
    found: list[tuple[str, str, bool]] = []
    work: list[tuple[str, str, str, bool]] = [(str(folder), "", top, True)]  # path, rel, real
    links: deque[tuple[str, str, str]] = deque()  # folder symlinks: path, rel, parent's real
    while work or links:
        if not work:
            path, rel, parent = links.popleft()
            real = os.path.realpath(path)
            if _is_above(real, parent):
                logger.warning("not following folder symlink %r: it loops back to %r", path, real)
            elif real not in seen:
                seen.add(real)
                work.append((path, rel, real, False))
            continue
        path, rel, real, direct = work.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            logger.warning("cannot list folder %r (%s); its images are left out", path, e)
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            child = f"{rel}/{e.name}" if rel else e.name
            is_link = e.is_symlink()
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir and is_link:
                links.append((e.path, child, real))
            elif is_dir:
                child_real = os.path.join(real, e.name)
                if child_real not in seen:
                    seen.add(child_real)
                    subdirs.append((e.path, child, child_real, direct))
            elif is_image_file(e.name):
                file_real = os.path.realpath(e.path) if is_link else os.path.join(real, e.name)
                found.append((child, file_real, direct and not is_link))
        work.extend(reversed(subdirs))
    return sorted(found)


def _one_per_file(found: list[_Found], spec: str) -> list[_Found]:
    """One entry per real file: the one reached without symlinks, else the first id. Copies
    with another class or split are an InputError (an image has one label and one split)."""
    groups: dict[str, list[_Found]] = {}
    for f in found:
        groups.setdefault(f.real, []).append(f)
    kept, dropped = [], []
    for real, group in groups.items():
        group.sort(key=lambda f: (not f.direct, f.id))
        keep = group[0]
        for other in group[1:]:
            if (other.cls, other.split) != (keep.cls, keep.split):
                a, b = sorted((keep, other))
                what = (
                    f"classes ({a.cls!r} and {b.cls!r})"
                    if a.cls != b.cls
                    else f"splits ({a.split} and {b.split})"
                )
                raise InputError(
                    f"DATA {spec!r}: {a.id!r} and {b.id!r} are the same file {real!r} under two "
                    f"{what}; an image has one class and one split: remove one of them"
                )
        kept.append(keep)
        dropped += [(o.id, keep.id) for o in group[1:]]
    if dropped:
        logger.warning(
            "DATA %r: %d file(s) reached twice through symlinks are listed once, e.g. %r as %r",
            spec,
            len(dropped),
            dropped[0][1],
            dropped[0][0],
        )
    return kept


# --------------------------------------------------------------------------- shared


def _safe_name(name: str) -> str:
    """A name usable in store paths: letters, digits, ``._-`` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"


def _build(
    spec: str,
    name: str,
    kind: str,
    root: str,
    class_names: tuple[str, ...],
    ids: list[str],
    labels: list[int],
    splits: list[str] | None,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    outside_paths: bool = False,
) -> ImageSource:
    """Complete the splits, sort by id and freeze into an ImageSource."""
    assert kind in _KINDS  # one class is allowed here; the embed stage refuses it
    done = assign_splits(
        labels, splits, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    order = sorted(range(len(ids)), key=ids.__getitem__)
    records = tuple(ImageRecord(ids[i], int(labels[i]), done[i]) for i in order)
    counts = {s: sum(r.split == s for r in records) for s in SPLITS}
    logger.info(
        "%s source %r: %d images, %d classes, splits %s",
        kind,
        name,
        len(records),
        len(class_names),
        counts,
    )
    return ImageSource(
        name=name,
        kind=kind,
        location=spec,
        class_names=class_names,
        records=records,
        root=root,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        outside_paths=outside_paths,
    )
