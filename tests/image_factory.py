"""Deterministic generated image data sets for tests: shapes drawn with Pillow.

Every function takes a seed; the same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import io
import random
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CORRUPT_NAME = "corrupt.jpg"  # truncated JPEG in the shapes folder's "square" class
ODD_FILES: dict[str, str] = {  # odd-mode files in the shapes folder: class/file → mode written
    "circle/odd_l.png": "L",
    "circle/odd_p.png": "P",
    "square/odd_rgba.png": "RGBA",
    "square/odd_cmyk.jpg": "CMYK",
    "triangle/odd_16bit.png": "I;16",
    "triangle/odd_upper.JPG": "RGB",
}


def draw_shape(shape: str, *, size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    """An RGB image (W, H = ``size``) of one filled shape on a noisy background."""
    rng = random.Random(f"{shape}-{seed}")
    w, h = size
    bg = np.random.default_rng(rng.randrange(2**32)).integers(0, 60, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    colour = (rng.randrange(150, 256), rng.randrange(150, 256), rng.randrange(150, 256))
    cx, cy, r = w // 2 + rng.randrange(-4, 5), h // 2 + rng.randrange(-4, 5), min(w, h) // 3
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        raise ValueError(shape)
    return img


def save_as(img: Image.Image, path: Path, mode: str) -> None:
    """Save ``img`` (RGB) converted to ``mode`` in the format of ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        a = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(a).save(path)  # uint16 (H, W) → I;16 PNG
        return
    if mode == "P":
        p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 0
        p.save(path, transparency=0)
        return
    out = img.convert(mode)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        out.save(path, format="JPEG", quality=90)
    else:
        out.save(path)


def write_corrupt_jpeg(path: Path, *, seed: int = 0) -> None:
    """A JPEG cut in half: the header parses, decoding fails."""
    buf = io.BytesIO()
    draw_shape("square", seed=seed).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])


def make_shapes_folder(
    root: Path, *, per_class: int = 6, seed: int = 0, odd: bool = True, corrupt: bool = True
) -> Path:
    """ImageFolder layout ``root/<shape>/<file>``: JPEG and PNG files per class, plus the
    :data:`ODD_FILES` (odd modes, an upper-case extension), one corrupt JPEG, and non-image
    files that must be ignored. Returns ``root``."""
    for c, shape in enumerate(SHAPES):
        for i in range(per_class):
            ext = ".jpg" if i % 2 == 0 else ".png"
            save_as(
                draw_shape(shape, seed=seed * 1000 + c * 100 + i),
                root / shape / f"{shape}_{i:02d}{ext}",
                "RGB",
            )
    if odd:
        for rel, mode in ODD_FILES.items():
            shape = rel.split("/")[0]
            save_as(draw_shape(shape, seed=seed + 7), root / rel, mode)
    if corrupt:
        write_corrupt_jpeg(root / "square" / CORRUPT_NAME, seed=seed)
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir(exist_ok=True)
    save_as(draw_shape("circle"), root / ".hidden" / "x.png", "RGB")
    return root


def write_animated_gif(path: Path, colours: list[tuple[int, int, int]], *, size=(24, 20)) -> None:
    """An animated GIF, one solid-colour frame per entry of ``colours`` (frame 0 first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def touch_images(root: Path, rels: list[str]) -> Path:
    """Empty files at ``root/<rel>`` (enough for listing a source; they do not decode)."""
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


def make_split_folder(root: Path, *, per_class: int = 6, seed: int = 0) -> Path:
    """ImageFolder with ``train/`` and ``test/`` split folders (no ``val/``). Returns ``root``."""
    for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
        for c, shape in enumerate(SHAPES):
            for i in range(n):
                img = draw_shape(
                    shape, seed=seed * 1000 + c * 100 + i + (50 if split == "test" else 0)
                )
                save_as(img, root / split / shape / f"{i:02d}.png", "RGB")
    return root


def make_cub_root(root: Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """A CUB-200-2011-like root: ``images/NNN.Name/*.jpg`` and the four metadata files."""
    classes = [f"{k + 1:03d}.{s.capitalize()}_Shape" for k, s in enumerate(SHAPES)]
    lines = {"images": [], "labels": [], "split": [], "classes": []}
    image_id = 0
    for k, (cls, shape) in enumerate(zip(classes, SHAPES, strict=True)):
        lines["classes"].append(f"{k + 1} {cls}")
        for i in range(per_class):
            image_id += 1
            rel = f"{cls}/{shape}_{i:04d}.jpg"
            save_as(draw_shape(shape, seed=seed * 1000 + k * 100 + i), root / "images" / rel, "RGB")
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {k + 1}")
            lines["split"].append(f"{image_id} {1 if i % 2 == 0 else 0}")
    _write_lines(root / "images.txt", lines["images"])
    _write_lines(root / "image_class_labels.txt", lines["labels"])
    _write_lines(root / "train_test_split.txt", lines["split"])
    _write_lines(root / "classes.txt", lines["classes"])
    return root


def make_nabirds_root(root: Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """A NABirds-like root: sparse class ids, names with spaces, UUID image ids, hierarchy.txt,
    and classes.txt naming internal nodes no image uses."""
    used = {295: "Bald Eagle", 313: "Red tailed Hawk", 1000: "Snowy Owl (adult)"}
    all_classes = {0: "Birds", 1: "Raptors", **used}
    lines = {"images": [], "labels": [], "split": []}
    rng = random.Random(seed)
    for k, (cid, shape) in enumerate(zip(sorted(used), SHAPES, strict=True)):
        for i in range(per_class):
            image_id = str(uuid.UUID(int=rng.getrandbits(128)))
            rel = f"{cid:04d}/{image_id.replace('-', '')}.jpg"
            save_as(draw_shape(shape, seed=seed * 1000 + k * 100 + i), root / "images" / rel, "RGB")
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {cid}")
            lines["split"].append(f"{image_id} {0 if i == 0 else 1}")
    _write_lines(root / "images.txt", lines["images"])
    _write_lines(root / "image_class_labels.txt", lines["labels"])
    _write_lines(root / "train_test_split.txt", lines["split"])
    _write_lines(root / "classes.txt", [f"{c} {n}" for c, n in sorted(all_classes.items())])
    _write_lines(root / "hierarchy.txt", ["1 0", *(f"{c} 1" for c in sorted(used))])
    return root


def make_csv_manifest(
    root: Path, *, per_class: int = 5, seed: int = 0, header: bool = True, split: bool = True
) -> Path:
    """Images under ``root/img/`` and ``root/manifest.csv`` with rows ``path,label[,split]``
    (labels are class names with spaces; paths relative to the CSV). Returns the CSV path."""
    labels = {"circle": "round thing", "square": "box", "triangle": "wedge"}
    rows = []
    for k, shape in enumerate(SHAPES):
        for i in range(per_class):
            rel = f"img/{shape}-{i}.png"
            save_as(draw_shape(shape, seed=seed * 1000 + k * 100 + i), root / rel, "RGB")
            s = "test" if i == 0 else ("val" if i == 1 else "train")
            rows.append([rel, labels[shape], s] if split else [rel, labels[shape]])
    path = root / ("manifest.csv" if header else "manifest_noheader.csv")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["path", "label", "split"] if split else ["path", "label"])
        w.writerows(rows)
    return path


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
