"""``carrot bench quality``, ``carrot bench perf`` and ``carrot bench faults``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.cli_args import positive_int


def add_bench(sub: argparse._SubParsersAction, parser_class: type) -> None:
    p = sub.add_parser("bench", help="quality and performance benchmarks")
    bs = p.add_subparsers(dest="bench_command", metavar="KIND", parser_class=parser_class)
    bs.required = True
    q = bs.add_parser("quality", help="does CARROT help? methods × shots × seeds, paired")
    q.add_argument(
        "--store",
        action="append",
        default=[],
        metavar="URL",
        help="also run on this store (repeatable), e.g. CUB-200 with DINOv2",
    )
    q.add_argument("--quick", action="store_true", help="fewer regimes and seeds (< 5 min CPU)")
    q.add_argument(
        "--no-builtin", action="store_true", help="skip the built-in synthetic and digits data sets"
    )
    q.add_argument(
        "--partial",
        action="store_true",
        help="the partially frozen regime instead: the last 1-2 blocks of a small ViT trained "
        "over cached activations (built-in digits cache; --store: activation caches)",
    )
    q.add_argument("--methods", metavar="LIST", help="comma list (default: all)")
    q.add_argument("--shots", metavar="LIST", help="comma list of k, 'all' = full data")
    q.add_argument("--seeds", type=positive_int, metavar="S", help="seeds per regime")
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", metavar="DIR", help="default $CARROT_HOME/bench/quality")
    q.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    q.set_defaults(run=run_quality_cmd)
    f = bs.add_parser("perf", help="stage-1 and stage-2 speed, each as a ratio to its baseline")
    f.add_argument("--quick", action="store_true", help="fewer repeats (< 3 min CPU)")
    f.add_argument("--device", default="auto")
    f.add_argument("--json", metavar="FILE", help="default $CARROT_HOME/bench/perf.json")
    f.set_defaults(run=run_perf_cmd)
    x = bs.add_parser(
        "faults",
        help="bad inputs, corrupt images, kill -9 (embed, train, finetune, sweep), disk full, "
        "read-only places, concurrent writers and fuzzed inputs, counted (flows.faults)",
    )
    x.add_argument("--quick", action="store_true", help="3 kill trials instead of 20")
    x.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    x.add_argument("--json", metavar="FILE", help="default $CARROT_HOME/bench/faults.json")
    x.set_defaults(run=run_faults_cmd)


def run_quality_cmd(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from pipeline.evaluation.suite import SuiteSettings, run_suite

    shots = None
    if args.shots:
        try:
            shots = tuple(None if s.strip() == "all" else int(s) for s in args.shots.split(","))
        except ValueError:
            raise InputError(f"--shots {args.shots!r}: expected e.g. 1,4,16,all") from None
    settings = SuiteSettings(
        quick=args.quick,
        stores=tuple(args.store),
        builtin=not args.no_builtin,
        methods=tuple(m.strip() for m in args.methods.split(",")) if args.methods else None,
        shots=shots,
        seeds=args.seeds,
        device=args.device,
        partial=args.partial,
    )
    from pipeline.home import carrot_home

    out = Path(args.out) if args.out else carrot_home() / "bench" / "quality"
    t0 = time.perf_counter()
    result = run_suite(settings, out)
    if args.json:
        print(json.dumps(result["summary"], default=str))
    else:
        print(result["markdown"])
        print(f"wrote {out}/quality.json, quality.md and plots ({time.perf_counter() - t0:.0f} s)")
    return 0


def run_perf_cmd(args: argparse.Namespace) -> int:
    from benchmarks.perf import format_table, run, write_json

    result = run(quick=args.quick, device=args.device)
    from pipeline.home import carrot_home

    path = write_json(result, args.json or carrot_home() / "bench" / "perf.json")
    print(format_table(result))
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return 0


def run_faults_cmd(args: argparse.Namespace) -> int:
    """Exit 0 when every count with target 0 is 0, else 1 (the table says which)."""
    from flows.faults.report import failures, run_faults, table
    from pipeline.home import carrot_home

    path = Path(args.json) if args.json else carrot_home() / "bench" / "faults.json"
    result = run_faults(path, quick=args.quick, seed=args.seed)
    print(table(result))
    bad = failures(result)
    for line in bad:
        print(f"FAILED   {line}")
    print(f"wrote {path} ({result['seconds']:.0f} s)")
    return 1 if bad else 0
