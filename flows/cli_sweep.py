"""``carrot sweep``: compare backbones on one data set (stage 1 + stage 2 + k-NN per backbone)."""

from __future__ import annotations

import argparse
import json

from flows.cli_args import add_dask_options, dask_options, positive_int, positive_ints
from pipeline.errors import InputError


def add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="compare timm backbones on DATA: probe, k-NN, CARROT vs plain, per backbone",
        description="For each backbone: stage 1 (a cache hit when its store exists), the "
        "linear probe, weighted k-NN (k 10, 20) and CARROT vs plain; then one table "
        "(printed, sweep.csv, sweep.json, sweep.png, Prefect artifacts). A failed backbone is "
        "a row with its error; a rerun redoes only what is missing.",
    )
    p.add_argument("data", metavar="DATA", nargs="?", help="as for carrot embed")
    p.add_argument("--backbones", metavar="A,B,C", help="timm model names, comma-separated")
    p.add_argument("--config", metavar="FILE", help="a sweep.toml spec (version = 1)")
    p.add_argument("--aug", default=None, help="augmentations (default none,carrot)")
    p.add_argument(
        "--shots",
        type=positive_ints,
        metavar="K,K",
        help="few-shot probes too: K labelled images per class, e.g. 1,5,10 (one column each)",
    )
    p.add_argument(
        "--seeds", type=positive_int, default=None, metavar="S", help="few-shot draws (default 3)"
    )
    p.add_argument("--root", metavar="DIR|URL", help="store root (default $CARROT_HOME/stores)")
    p.add_argument("--out", metavar="DIR", help="default $CARROT_HOME/sweeps/<DATA>")
    p.add_argument("--image-size", type=positive_int, default=None, metavar="N")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    add_dask_options(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.set_defaults(run=run_sweep_cmd)


def spec_from_args(args: argparse.Namespace):
    """The :class:`SweepSpec` of the command line (a --config file, options overriding it)."""
    from pipeline.evaluation.sweep import SweepSpec
    from pipeline.heads.probe import parse_names

    overrides = {
        "data": args.data,
        "backbones": parse_names(args.backbones) if args.backbones else None,
        "augs": parse_names(args.aug) if args.aug else None,
        "shots": args.shots,
        "seeds": args.seeds,
        "root": args.root,
        "out": args.out,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    if args.config:
        return SweepSpec.from_toml(args.config, **overrides)
    if not args.data or not args.backbones:
        raise InputError("carrot sweep: give DATA and --backbones a,b,c, or --config sweep.toml")
    return SweepSpec(**{k: v for k, v in overrides.items() if v is not None})


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flows.runtime import flow_settings
    from pipeline.evaluation.sweep import default_out, format_rows
    from pipeline.terminal import printable

    spec = spec_from_args(args)
    options = dask_options(args)
    out = Path(spec.out) if spec.out else default_out(spec)
    from flows.sweep import sweep_flow
    from pipeline.cluster import dask_cluster

    with dask_cluster(options) as cluster, flow_settings():
        if cluster is None:
            result = sweep_flow(spec, str(out))
        else:
            flow = sweep_flow.with_options(task_runner=cluster.task_runner())
            result = flow(spec, str(out), distributed=True)
    rows = result["rows"]
    if args.json:
        print(json.dumps({"rows": rows, "files": result["files"]}))
    else:
        for line in format_rows(rows, spec.shots):
            print(printable(line))
        print(f"wrote {printable(result['out'])}/sweep.csv, sweep.json, sweep.png")
    failed = [r for r in rows if r.get("error")]
    if len(failed) == len(rows):
        raise InputError(f"carrot sweep: every backbone failed; first: {failed[0]['error']}")
    return 0
