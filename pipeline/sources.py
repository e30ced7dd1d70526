"""Image data sources: resolve a DATA spec into a picklable, deterministic list of images.

DATA is one of (detected in this order):

- ``sklearn:digits`` — scikit-learn's 1 797 real 8×8 digit images, upscaled to 32×32 RGB.
- a ``.csv`` manifest — rows ``path,label[,split]`` (optional header naming the columns);
  paths relative to the CSV's folder; labels are class names.
- a CUB-200-2011 root (``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``,
  ``classes.txt``, ``images/``) or a NABirds root (the same plus ``hierarchy.txt``).
- an ImageFolder — one sub-folder per class, optionally below ``train/``, ``val/``, ``test/``.

Splits the source does not give are carved by :mod:`pipeline.splits` (stratified, seeded).
Records are sorted by id. An :class:`ImageSource` holds plain data only (it is pickled to
DataLoader and Dask workers); files are opened when :meth:`ImageSource.load` is called.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import InputError
from pipeline.images import IMG_EXTENSIONS, ImageLoadError, is_image_file, load_rgb
from pipeline.splits import SPLITS, assign_splits, check_fractions

__all__ = [
    "SKLEARN_DATASETS",
    "ImageLoadError",  # re-exported: ImageSource.load raises it
    "ImageRecord",
    "ImageSource",
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

    def fingerprint(self) -> str:
        """sha256 hex of the content: ids, file sizes and mtimes (ns), labels, splits, classes
        and split settings (in-memory sets: pixel bytes instead of file stats)."""
        h = hashlib.sha256()

        def feed(*parts: object) -> None:
            for p in parts:
                h.update(str(p).encode())
                h.update(b"\x1f")
            h.update(b"\x1e")

        feed("carrot-source-v1", self.kind, *self.class_names)
        feed(self.val_fraction, self.test_fraction, self.seed)
        pixels = _sklearn_pixels(self.name) if self.kind == "sklearn" else None
        for i, r in enumerate(self.records):
            if pixels is not None:
                feed(r.id, hashlib.sha256(pixels[_sklearn_index(r.id)].tobytes()).hexdigest())
            else:
                try:
                    st = os.stat(self.path(i))  # type: ignore[arg-type]
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:
                    size, mtime = -1, -1
                feed(r.id, size, mtime)
            feed(r.label, r.split)
        return h.hexdigest()


def resolve_source(
    spec: str, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> ImageSource:
    """Resolve DATA (see the module doc) into an :class:`ImageSource`.

    Args:
        spec: a folder, a CUB/NABirds root, a ``.csv`` manifest or ``sklearn:<name>``.
        val_fraction, test_fraction: fractions carved for splits the source does not give.
        seed: seed of the carving.

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
        return _csv_source(spec, path, **settings)
    present = [f for f in _CUB_FILES if (path / f).is_file()]
    if "images.txt" in present and len(present) > 1:
        return _cub_source(spec, path, present, **settings)
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


def _csv_source(spec: str, path: Path, **settings) -> ImageSource:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [
            (n, row) for n, row in enumerate(csv.reader(f), start=1) if any(c.strip() for c in row)
        ]
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
    entries: list[tuple[str, str, str]] = []
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
        entries.append(
            (os.path.normpath(p).replace(os.sep, "/"), label, _SPLIT_ALIASES.get(split, ""))
        )
    if not entries:
        raise InputError(
            f"CSV manifest {spec!r} has a header but no rows; add rows path,label[,split]"
        )
    ids = [e[0] for e in entries]
    dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
    if dupes:
        raise InputError(
            f"CSV manifest {spec!r} lists {dupes[:5]} more than once; list each image once"
        )
    missing = [i for i in ids if not (base / i).is_file()]
    if missing:
        raise InputError(
            f"CSV manifest {spec!r}: {len(missing)} path(s) do not exist, e.g. {missing[:5]}; "
            f"paths are relative to the CSV's folder {str(base)!r}"
        )
    class_names = tuple(sorted({e[1] for e in entries}))
    index = {c: k for k, c in enumerate(class_names)}
    given_splits = [e[2] for e in entries]
    if any(given_splits) and not all(given_splits):
        raise InputError(
            f"CSV manifest {spec!r}: the split column is filled for some rows only; fill it for "
            "every row (train/val/test) or leave it out to have splits made for you"
        )
    splits = given_splits if all(given_splits) else None
    labels = [index[e[1]] for e in entries]
    name = _safe_name(path.stem)
    return _build(spec, name, "csv", str(base), class_names, ids, labels, splits, **settings)


# --------------------------------------------------------------------------- CUB / NABirds


def _read_table(path: Path, spec: str) -> list[tuple[str, str]]:
    """Lines ``key value...`` of a CUB/NABirds metadata file → (key, rest) pairs."""
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
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


def _cub_source(spec: str, root: Path, present: list[str], **settings) -> ImageSource:
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
    label_list = [index[int(labels[k])] for k in keys]
    splits = ["train" if flags[k] == 1 else "test" for k in keys]
    name = "cub200" if kind == "cub" else "nabirds"
    image_root = str(root / "images")
    return _build(spec, name, kind, image_root, class_names, ids, label_list, splits, **settings)


# --------------------------------------------------------------------------- ImageFolder


def _folder_source(spec: str, root: Path, **settings) -> ImageSource:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_ALIASES]
    entries: list[tuple[str, str, str]] = []  # (id, class name, split or "")
    if split_dirs:
        others = [d for d in subdirs if d not in split_dirs]
        if others:
            raise InputError(
                f"DATA {spec!r} mixes split folders {split_dirs} with other folders {others[:5]}; "
                "put every class folder under train/, val/ or test/, or use no split folders"
            )
        for sd in split_dirs:
            split = _SPLIT_ALIASES[sd.lower()]
            for cls in sorted(
                d.name for d in (root / sd).iterdir() if d.is_dir() and not d.name.startswith(".")
            ):
                entries += [(f"{sd}/{cls}/{f}", cls, split) for f in _walk_images(root / sd / cls)]
    else:
        for cls in subdirs:
            entries += [(f"{cls}/{f}", cls, "") for f in _walk_images(root / cls)]
    stray = [f.name for f in root.iterdir() if f.is_file() and is_image_file(f.name)]
    if stray:
        logger.warning(
            "ignoring %d image(s) directly in %s (not in a class folder)", len(stray), root
        )
    if not entries:
        what = "is empty" if not any(root.iterdir()) else "has no class sub-folders with images"
        raise InputError(
            f"DATA {spec!r} {what}; an image folder needs one sub-folder per class holding "
            f"images ({', '.join(IMG_EXTENSIONS)}), optionally below train/, val/, test/"
        )
    class_names = tuple(sorted({e[1] for e in entries}))
    if len(class_names) < 2:
        logger.warning("DATA %r has a single class %r", spec, class_names[0])
    index = {c: k for k, c in enumerate(class_names)}
    entries.sort()
    ids = [e[0] for e in entries]
    labels = [index[e[1]] for e in entries]
    splits = [e[2] for e in entries] if split_dirs else None
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


def _walk_images(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursive, hidden entries skipped), as sorted posix paths
    relative to ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for f in filenames:
            if not f.startswith(".") and is_image_file(f):
                found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(found)


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
) -> ImageSource:
    """Complete the splits, sort by id and freeze into an ImageSource."""
    assert kind in _KINDS
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
    )
