"""Stage-1 benchmark: end-to-end embedding throughput, cache-hit rerun, and store read speed.

Every figure is a ratio against a baseline measured in the same run:

- ``e2e/bare``: images/s of the whole stage (JPEG decode + transform + forward + Zarr write,
  through ``pipeline.embed.run.run_embedding``) over images/s of the bare model forward on ready
  tensors — same model (resnet18, 224 px, random init) and batch. Target ≥ 0.8 on a 2-core CPU.
- ``cache-hit/first``: wall time of a rerun that finds the complete store over the first run.
  Target < 5 %. (The ``carrot embed`` command adds Prefect's start-up on top: reported apart.)
- ``read/np.load``: reading a whole store into float32 NumPy over ``np.load`` + ``astype`` of the
  same array from an ``.npy`` file (and the raw float16 read over plain ``np.load``).

Run: ``python -m benchmarks.embed [--quick] [--device auto] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks._report import median_time, write_report
from pipeline.embed.backbone import BackboneConfig, create_backbone
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding

DEFAULT_JSON = Path("benchmarks/results/embed.json")
MODEL, IMAGE_SIZE = "resnet18", 224


def make_jpeg_folder(root: Path, *, n: int, classes: int = 4, seed: int = 0) -> Path:
    """``n`` random-texture JPEGs of 500×375 (CUB-like sizes) in ImageFolder layout."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(47, 63, 3), dtype=np.uint8)  # smooth-ish texture
        img = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
        img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bare_forward_rate(device: str, batch: int, repeats: int) -> float:
    """Images/s of the backbone's forward on ready, device-resident tensors."""
    bb = create_backbone(BackboneConfig(name=MODEL, device=device))
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE).to(bb.device)
    seconds = median_time(lambda: bb.forward(x), repeats=repeats, warmup=1)
    return batch / seconds


def stage_rates(folder: Path, root: Path, device: str, batch: int) -> dict[str, Any]:
    """First run (images/s over the extraction) and a cache-hit rerun (seconds)."""
    settings = EmbedSettings(
        data=str(folder),
        backbone=BackboneConfig(name=MODEL, device=device),
        extract=ExtractConfig(batch_size=batch),
        root=str(root),
    )
    first = run_embedding(settings)
    hits = [run_embedding(settings).seconds for _ in range(3)]
    return {
        "e2e_rate": first.images_per_second,
        "first_seconds": first.seconds,
        "hit_seconds": statistics.median(hits),
        "n": first.n,
    }


def read_speeds(tmp: Path, *, rows: int, dim: int = 768, repeats: int = 5) -> dict[str, float]:
    """Median seconds: whole-store reads vs ``np.load`` of the same float16 array."""
    from stores import StoreIdentity, open_store, open_writer, store_url

    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    np.save(tmp / "features.npy", data)
    identity = StoreIdentity(
        dataset="bench",
        backbone="none",
        weights={"kind": "random", "seed": 0},
        data_config={},
        views=0,
        dtype="float16",
        versions={},
        input_fingerprint="0",
    )
    url = store_url(str(tmp / "stores"), identity)
    ids = [f"r{i}" for i in range(rows)]
    with open_writer(
        url,
        identity,
        ids=ids,
        labels=np.zeros(rows, np.int64),
        split=["train"] * rows,
        class_names=["a"],
        dim=dim,
    ) as w:
        for i in range(w.n_chunks):
            r = w.chunk_rows_range(i)
            w.write_chunk(
                i, data[r.start : r.stop], valid=np.ones(len(r), bool), errors=[""] * len(r)
            )
        w.finalize(timings={})
    store = open_store(url)
    npy = str(tmp / "features.npy")
    return {
        "np_load": median_time(lambda: np.load(npy), repeats=repeats, warmup=1),
        "np_load_f32": median_time(
            lambda: np.load(npy).astype(np.float32), repeats=repeats, warmup=1
        ),
        "store_f32": median_time(lambda: store.features(), repeats=repeats, warmup=1),
        "mbytes": data.nbytes / 1e6,
    }


def run(quick: bool = False, device: str = "auto") -> dict[str, Any]:
    """Measure everything; returns ``{"rows": [...], "device": ..., "quick": ...}``.

    Ratios are medians over rounds; each round measures its baseline right before its run.
    """
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    n = (512 if quick else 2048) if cuda else (96 if quick else 256)
    batch = 128 if cuda else 32
    tmp = Path(tempfile.mkdtemp(prefix="carrot-bench-embed-"))
    try:
        folder = make_jpeg_folder(tmp / "images", n=n)
        rounds = []  # bare and end-to-end measured back to back: shared-machine load hits both
        for r in range(2 if quick else 3):
            bare_r = bare_forward_rate(device, batch, repeats=3 if quick else 5)
            rounds.append((bare_r, stage_rates(folder, tmp / f"stores{r}", device, batch)))
        reads = read_speeds(tmp, rows=20_000 if quick else 100_000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare = statistics.median(b for b, _ in rounds)
    e2e = statistics.median(st["e2e_rate"] for _, st in rounds)
    first = statistics.median(st["first_seconds"] for _, st in rounds)
    hit = statistics.median(st["hit_seconds"] for _, st in rounds)
    rows = [
        _row("bare forward (img/s)", bare),
        _row(
            "e2e embed (img/s)",
            e2e,
            bare,
            statistics.median(st["e2e_rate"] / b for b, st in rounds),
            ">= 0.8",
        ),
        _row(
            "cache-hit rerun (s)",
            hit,
            first,
            statistics.median(st["hit_seconds"] / st["first_seconds"] for _, st in rounds),
            "< 0.05",
        ),
        _row(
            "read store -> f32 (s)",
            reads["store_f32"],
            reads["np_load_f32"],
            reads["store_f32"] / reads["np_load_f32"],
            "<= 1.25 (time)",
        ),
        _row("np.load f16 (s)", reads["np_load"]),
    ]
    sizes = {
        "images": n,
        "batch": batch,
        "model": MODEL,
        "px": IMAGE_SIZE,
        "read_mb": reads["mbytes"],
        "rounds": len(rounds),
    }
    return {"rows": rows, "device": device, "quick": quick, "sizes": sizes}


def _row(
    metric: str,
    value: float,
    baseline: float | None = None,
    ratio: float | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    return {
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(quick=args.quick, device=args.device)
    write_report(
        f"embed ({MODEL} {IMAGE_SIZE}px) on {result['device']}",
        result["rows"],
        json_path=args.json,
        extra={"sizes": result["sizes"], "seconds": time.perf_counter() - t0},
    )


if __name__ == "__main__":
    main()
