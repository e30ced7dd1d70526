"""Corrupt and odd image files through ``carrot embed``, then ``carrot train`` and
``carrot predict``.

The folder holds good images and: a truncated JPEG, a zero-byte file, a text file named
``.jpg``, a decompression bomb (a PNG declaring 20 000 × 20 000 pixels), a CMYK JPEG, a 16-bit
PNG, a palette PNG with transparency, an animated GIF, a folder symlink loop, and file names with
spaces, unicode and a newline. The unreadable four must be skipped and recorded (``--strict``:
refused), everything else embedded, nothing may crash, and every embedded id must come back out
of ``predictions.csv`` unchanged.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from flows.faults.console import carrot, environment
from flows.faults.kills import shared_api_url

UNREADABLE = ("a/truncated.jpg", "a/zero.jpg", "b/text.jpg", "b/bomb.png")
ODD = (
    "a/cmyk.jpg",
    "a/sixteen.png",
    "b/palette.png",
    "b/animated.gif",
    "a/with space.png",
    "b/ünïcödé.png",
    "a/new\nline.png",
)


def _bomb(path: Path, side: int = 20_000) -> None:
    """A valid 1×1 PNG whose header declares ``side`` × ``side`` pixels."""
    from PIL import Image

    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def make_folder(root: Path) -> Path:
    """The image folder (classes a and b, 8 good images each, plus the files above)."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def rgb(size=(40, 32)) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            rgb().save(root / cls / f"good_{i}.png")
    good = root / "a" / "truncated.jpg"
    rgb().save(good, quality=90)
    good.write_bytes(good.read_bytes()[:200])
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("this is not an image\n")
    _bomb(root / "b" / "bomb.png")
    rgb().convert("CMYK").save(root / "a" / "cmyk.jpg")
    gray = np.asarray(rgb().convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(root / "a" / "sixteen.png")
    rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(
        root / "b" / "palette.png", transparency=0
    )
    frames = [rgb(), rgb()]
    frames[0].save(root / "b" / "animated.gif", save_all=True, append_images=frames[1:])
    for name in ("a/with space.png", "b/ünïcödé.png", "a/new\nline.png"):
        rgb().save(root / name)
    os.symlink("..", root / "a" / "loop")  # a folder symlink loop
    return root


def run_corrupt_images(root: Path) -> dict[str, Any]:
    """Embed the folder (and again with ``--strict``), train, predict; the counts."""
    folder = make_folder(root / "data")
    with environment(PREFECT_API_URL=shared_api_url(), CARROT_HOME=str(root / "home")):
        return _run(folder, root)


def _run(folder: Path, root: Path) -> dict[str, Any]:
    common = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0"]
    code, out, err = carrot(["embed", str(folder), *common, "--root", str(root / "s"), "--json"])
    result: dict[str, Any] = {
        "files": len(UNREADABLE) + len(ODD),
        "expected_skipped": len(UNREADABLE),
        "crashes": 0,
        "skipped": 0,
        "ids_lost": len(ODD),
        "strict_not_refused": 1,
    }
    if code != 0:
        result["crashes"] = 1
        result["error"] = err.strip().splitlines()[-1:]
        return result
    summary = json.loads(out)
    skipped = sorted(summary["skipped"])
    result["skipped"] = len(skipped)
    result["skipped_ids"] = skipped
    result["skipped_right"] = skipped == sorted(UNREADABLE)
    code, _, err = carrot(["embed", str(folder), *common, "--root", str(root / "x"), "--strict"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # exit 2, the last line naming the first unreadable image (warnings may come before it)
    refused = code == 2 and bool(lines) and "unreadable image" in lines[-1]
    result["strict_not_refused"] = int(not refused)
    run, predictions = root / "run", root / "predictions.csv"
    trained, _, err_train = carrot(["train", summary["store"], "--out", str(run), "--json"])
    predicted, _, err_predict = carrot(
        ["predict", summary["store"], "--head", str(run), "--out", str(predictions)]
    )
    if trained != 0 or predicted != 0:
        result["crashes"] += 1
        result["error"] = (err_train + err_predict).strip().splitlines()[-1:]
        return result
    from stores import open_store

    stored = set(open_store(summary["store"]).ids())
    with predictions.open(newline="") as f:
        written = {row["id"] for row in csv.DictReader(f)}
    want = set(ODD) | {f"{c}/good_{i}.png" for c in "ab" for i in range(8)}
    result["ids_lost"] = len(want - stored) + len(stored - written)
    return result
