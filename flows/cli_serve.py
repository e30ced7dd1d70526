"""``carrot serve``: scheduled runs of a sweep, or of an embed / train command, on a Prefect
server (``carrot server start``, or ``PREFECT_API_URL``)."""

from __future__ import annotations

import argparse
import math
import sys

from flows.cli_args import positive_int


def _seconds(text: str) -> float:
    """``--interval``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="scheduled runs of a sweep or an embed/train command on a Prefect server",
        description="Register a deployment (a sweep spec with --config, and/or a carrot embed "
        "or train command line after '--') with a schedule on the Prefect server (carrot "
        "server start, or PREFECT_API_URL), and run each due run, one at a time, until Ctrl-C "
        "or --limit runs. The spec file is read at each run. Stopping pauses the schedule.",
        epilog='example: carrot serve --cron "0 2 * * *" -- embed DATA --backbone resnet18',
    )
    p.add_argument("--config", metavar="FILE", help="a sweep.toml spec: serve that sweep")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron", metavar="EXPR", help='a cron schedule in UTC, e.g. "0 2 * * *" (02:00 daily)'
    )
    when.add_argument(
        "--interval", type=_seconds, metavar="SECONDS", help="a run every SECONDS seconds"
    )
    p.add_argument(
        "--name",
        metavar="NAME",
        help="deployment name (default: the spec file's name or the command)",
    )
    p.add_argument(
        "--limit", type=positive_int, metavar="N", help="stop after N runs (default: until Ctrl-C)"
    )
    p.add_argument("--out", metavar="DIR", help="the sweep's output folder (overrides the spec)")
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="a command to serve, last: embed DATA --backbone NAME …, or train STORE … (the "
        "'--' before it is optional; everything after it belongs to the command)",
    )
    p.set_defaults(run=run_serve)


def served_command(args: argparse.Namespace) -> list[str]:
    """The command line to serve (the optional leading ``--`` dropped)."""
    return args.argv[1:] if args.argv[:1] == ["--"] else list(args.argv)


def run_serve(args: argparse.Namespace) -> int:
    """Check every input (schedule, spec, command), then the server; then serve."""
    from flows.serve import build_deployments, require_server, serve
    from pipeline.terminal import printable

    deployments = build_deployments(
        config=args.config,
        argv=served_command(args),
        name=args.name,
        cron=args.cron,
        interval=args.interval,
        out=args.out,
    )
    url = require_server()
    when = f"cron {args.cron} (UTC)" if args.cron else f"every {args.interval:g} s"
    until = f"stops after {args.limit} run(s)" if args.limit else "Ctrl-C stops"
    for d in deployments:
        print(f"serving  {d.flow_name}/{d.name}  {when}  on {url}")
    print(f"         runs one at a time; {until}", flush=True)
    try:
        served = serve(deployments, limit=args.limit)
    except KeyboardInterrupt:  # a second Ctrl-C
        print("carrot serve: interrupted", file=sys.stderr)
        return 130
    for r in served.runs:
        print(f"run      {r.name}  {r.state.name if r.state else 'unknown'}")
    if served.interrupted:
        print("carrot serve: stopped (schedules paused)")
        return 0
    bad = [r for r in served.runs if r.state is None or not r.state.is_completed()]
    if bad:
        why = printable(bad[0].state.message) if bad[0].state and bad[0].state.message else ""
        raise RuntimeError(
            f"{len(bad)} of {len(served.runs)} scheduled runs did not complete; first: "
            f"{bad[0].name} {why}".rstrip()
        )
    return 0
