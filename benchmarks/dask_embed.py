"""Stage 1 on Dask: images/s of stage 1 in this process vs on LocalCluster workers, for the
README's cost model ("how many workers for a deadline").

Rows (resnet18, 224 px, random init, generated 500×375 JPEGs, chunks of 64 rows; each a median
over ``repeats`` runs into fresh store roots, after one untimed warm-up run per setting so the
workers have imported torch and built the model):

* ``in process`` — ``run_embedding`` with the default thread count (the baseline);
* ``in process, 1 thread`` — the same with one torch thread (one worker's share of the CPU);
* ``dask N×1`` — ``run_embedding`` with `pipeline.embed.parallel.dask_distribute` on carrot's
  LocalCluster (`pipeline.cluster`) of N worker processes with one thread each: the work units
  of ``carrot embed --dask-workers N`` without its Prefect task wrapping (about 0.1 s a unit).

Reported: extraction images/s (the store's own record: the units' wall time, Dask overheads
included, start-up excluded), images/s per worker, and the ratio to the baseline.

    python -m benchmarks.dask_embed [--quick] [--workers 1,2] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._report import write_report
from benchmarks.embed import IMAGE_SIZE, MODEL, make_jpeg_folder

DEFAULT_JSON = Path(__file__).parent / "results" / "dask_embed.json"


def _settings(data: Path, root: Path):
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings

    return EmbedSettings(
        data=str(data),
        backbone=BackboneConfig(name=MODEL, image_size=IMAGE_SIZE, device="cpu"),
        extract=ExtractConfig(batch_size=32),
        root=str(root),
        chunk_rows=64,
    )


def _rate(run, settings, scratch: Path, repeats: int) -> list[float]:
    """images/s of ``repeats`` runs (after one warm-up), each into a fresh root."""
    rates = []
    for k in range(repeats + 1):
        summary = run(replace(settings, root=str(scratch / f"root-{k}")))
        if k:
            rates.append(float(summary["images_per_second"]))
    return rates


def measure(n: int, workers: list[int], repeats: int) -> dict[str, Any]:
    from distributed import Client

    from pipeline.cluster import DaskOptions, dask_cluster
    from pipeline.embed.parallel import dask_distribute
    from pipeline.embed.run import run_embedding
    from pipeline.threads import torch_threads

    def in_process(settings):
        return run_embedding(settings).to_dict()

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = make_jpeg_folder(scratch / "jpegs", n=n)
        settings = _settings(data, scratch)

        def add(name: str, rates: list[float], n_workers: int) -> None:
            rate = statistics.median(rates)
            rows.append(
                {
                    "setting": name,
                    "workers": n_workers,
                    "images_per_s": round(rate, 1),
                    "per_worker": round(rate / n_workers, 1),
                    "samples": [round(r, 1) for r in rates],
                }
            )

        add("in process", _rate(in_process, settings, scratch / "a", repeats), 1)
        with torch_threads(1):
            add("in process, 1 thread", _rate(in_process, settings, scratch / "b", repeats), 1)
        for w in workers:
            with dask_cluster(DaskOptions(workers=w)) as cluster, Client(cluster.address) as c:
                distribute = dask_distribute(c, cluster.threads)

                def on_cluster(s, distribute=distribute):
                    return run_embedding(s, distribute=distribute).to_dict()

                add(f"dask {w}×1", _rate(on_cluster, settings, scratch / f"d{w}", repeats), w)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_in_process"] = round(r["images_per_s"] / base, 2) if base else None
    return {"model": MODEL, "image_size": IMAGE_SIZE, "images": n, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 images, 1 repeat")
    p.add_argument("--workers", default="1,2", help="LocalCluster sizes (default 1,2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    n, repeats = (256, 1) if args.quick else (512, args.repeats)
    result = measure(n, workers, repeats)
    write_report(
        f"stage 1 on Dask: {MODEL} {IMAGE_SIZE} px, {n} JPEGs",
        result.pop("rows"),
        json_path=args.json,
        extra=result,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
