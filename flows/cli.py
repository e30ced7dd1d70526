"""carrot: cached-embedding pipeline for fine-grained classification, with CARROT augmentation.

Exit codes: 0 success; 2 bad input or usage (one line on stderr naming the input and the fix);
1 anything else. ``CARROT_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from flows.cli_args import (
    add_dask_options,
    add_weights_options,
    checked_checkpoint,
    dask_options,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
)
from flows.cli_bench import add_bench
from flows.cli_finetune import add_finetune
from flows.cli_serve import add_serve
from flows.cli_sweep import add_sweep
from flows.cli_train import add_demo, add_predict, add_train
from flows.runtime import apply_defaults
from pipeline.errors import InputError
from pipeline.terminal import printable
from stores.errors import storage_error, write_failure

USAGE_ERRORS = (InputError,)  # the store errors derive from it


class UsageError(Exception):
    """A command-line usage problem (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2; the parsed namespace lists the chosen
    command's positional arguments in ``positionals`` (for `_refuse_empty_values`)."""

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if not action.option_strings:  # a positional argument
            known = self.get_default("positionals") or ()
            self.set_defaults(positionals=(*known, action.dest))
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The full ``carrot`` parser: embed, store, train, predict, demo, bench."""
    parser = _Parser(prog="carrot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_embed(sub)
    _add_store(sub)
    add_train(sub)
    add_predict(sub)
    add_demo(sub)
    add_bench(sub, _Parser)
    add_sweep(sub)
    add_finetune(sub)
    add_serve(sub)
    _add_server(sub)
    return parser


# --------------------------------------------------------------------------- embed
def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="stage 1: run a timm backbone over DATA into a Zarr store")
    p.add_argument(
        "data",
        metavar="DATA",
        help="ImageFolder dir, CUB/NABirds root, CSV manifest, or sklearn:digits",
    )
    p.add_argument("--backbone", required=True, metavar="NAME", help="timm model name")
    add_weights_options(p)
    p.add_argument("--root", metavar="DIR|URL", help="store root (default $CARROT_HOME/stores)")
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--image-size", type=positive_int, metavar="N", help="override input size")
    p.add_argument(
        "--views",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="augmented views per image stored beside the clean one",
    )
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument(
        "--features",
        default="pooled",
        metavar="MODE",
        help="pooled (timm's pre-logits, default) | cls+avgpool | last:N (class tokens of the "
        "last N blocks + mean patch token, DINOv2's linear-probe input; ViTs)",
    )
    p.add_argument("--workers", type=nonneg_int, metavar="N", help="decode workers (default auto)")
    p.add_argument(
        "--cache-at",
        metavar="block:-N",
        help="store what enters the last N blocks (ViT: tokens; ResNet, ConvNeXt: the feature "
        "map of the stage before the last N stages) for carrot train --trainable-blocks, instead "
        "of pooled embeddings",
    )
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=None,
        metavar="N",
        help="rows per store chunk, the unit of resume (default 1024; token caches: about "
        "64 MiB a chunk)",
    )
    p.add_argument("--val-fraction", type=fraction, default=0.1, metavar="F")
    p.add_argument("--test-fraction", type=fraction, default=0.2, metavar="F")
    p.add_argument("--strict", action="store_true", help="unreadable images are fatal")
    p.add_argument(
        "--wait",
        nargs="?",
        type=positive_float,
        const=math.inf,
        default=0.0,
        metavar="SECONDS",
        help="when another live `carrot embed` is writing this store, wait for it (up to SECONDS; "
        "alone: as long as it runs) instead of refusing; its finished store is then a cache hit",
    )
    p.add_argument(
        "--fingerprint",
        choices=("stat", "content"),
        default="stat",
        help="how the cache key sees image files. Default stat: each file's size and mtime "
        "(cheap; an edit that keeps the size and restores the mtime is missed). content: a "
        "sha256 of every byte (reads all files; touching a file does not matter)",
    )
    p.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="accept CSV manifest paths that are absolute or lead out of the CSV's folder "
        "(ids become relative to the common folder, recorded in the store)",
    )
    add_dask_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(run=_run_embed)


def embed_settings_from_args(args: argparse.Namespace):
    """Resolve CLI arguments into :class:`pipeline.embed.run.EmbedSettings` (validated)."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.cache_point import parse_cache_at
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, default_root
    from stores.schema import DEFAULT_CHUNK_ROWS

    checked_checkpoint(args.checkpoint)
    workers = {} if args.workers is None else {"num_workers": args.workers}
    extract = ExtractConfig(
        batch_size=args.batch_size, views=args.views, strict=args.strict, **workers
    )
    return EmbedSettings(
        data=args.data,
        backbone=BackboneConfig(
            name=args.backbone,
            pretrained=args.pretrained,
            checkpoint=args.checkpoint,
            seed=args.seed,
            image_size=args.image_size,
            device=args.device,
            features=args.features,
            cache_at=parse_cache_at(args.cache_at),
        ),
        extract=extract,
        root=args.root or default_root(),
        dtype=args.dtype,
        chunk_rows=args.chunk_rows or DEFAULT_CHUNK_ROWS,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        fingerprint=args.fingerprint,
        allow_outside_paths=args.allow_outside_paths,
        wait_s=args.wait,
    )


def _run_embed(args: argparse.Namespace) -> int:
    from flows.runtime import flow_settings
    from pipeline.embed.run import check_settings

    settings = embed_settings_from_args(args)
    options = dask_options(args)
    plan = check_settings(settings)  # every input check, before a Prefect server starts
    if settings.backbone.cache_at:
        settings = _activation_cache(settings, plan, chunk_rows=args.chunk_rows)
    from flows.embed import embed_flow
    from pipeline.cluster import dask_cluster

    with (
        dask_cluster(options) as cluster,
        flow_settings(),
        _progress_bar(enabled=sys.stderr.isatty()),
    ):
        if cluster is None:
            summary = embed_flow(settings)
        else:
            flow = embed_flow.with_options(task_runner=cluster.task_runner())
            summary = flow(settings, workers=cluster.threads)
    if args.json:
        print(json.dumps(summary))  # JSON escapes control characters itself
    else:
        _print_embed_summary(summary)
    return 0


def _activation_cache(settings, plan, *, chunk_rows: int | None):
    """An activation cache's settings (chunks of about 64 MiB unless --chunk-rows), after printing
    its storage cost on stderr."""
    import dataclasses
    import math

    import numpy as np

    from pipeline.embed.cache_point import chunk_rows_for

    extra = plan.identity.extra
    shape = extra.get("tokens") or extra["feature_map"]
    what = f"{shape[0]} tokens × {shape[1]}" if "tokens" in extra else "×".join(map(str, shape))
    itemsize = np.dtype(settings.dtype).itemsize
    rows = len(plan.source.records)
    size = rows * math.prod(shape) * itemsize
    print(
        f"cache    {extra['cache_at']}: {rows} rows × {what} × {itemsize} bytes = "
        + (f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"),
        file=sys.stderr,
    )
    rows_per_chunk = chunk_rows or chunk_rows_for(math.prod(shape), itemsize)
    return dataclasses.replace(settings, chunk_rows=rows_per_chunk)


def _print_embed_summary(s: dict) -> None:
    """Three lines: store, size and speed, skipped ids (control characters escaped)."""
    from pipeline.terminal import printable

    state = (
        "cache hit (no backbone work)" if s["cache_hit"] else f"{s['images_per_second']:.1f} img/s"
    )
    print(f"store    {printable(s['store'])}")
    print(f"images   {s['n']} × {s['dim']}  ({state}, {s['seconds']:.1f} s)")
    if s["skipped"]:
        shown = ", ".join(printable(i) for i in s["skipped"][:5])
        more = " …" if len(s["skipped"]) > 5 else ""
        print(f"skipped  {len(s['skipped'])} unreadable image(s): {shown}{more}")
    else:
        print("skipped  0")


class _progress_bar:
    """A rich progress bar (images/s, ETA) on stderr, fed by ``flows.progress``."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        from flows import progress

        self._bar = Progress(
            TextColumn("embedding"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[progress.data.speed]{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = None
        self._bar.start()

        def start(total: int) -> None:
            self._task = self._bar.add_task("embed", total=total, rate="")

        def advance(n: int) -> None:
            if self._task is not None:
                self._bar.advance(self._task, n)
                speed = self._bar.tasks[0].speed
                self._bar.update(self._task, rate=f"{speed:.1f} img/s" if speed else "")

        self._ctx = progress.reporting(start=start, advance=advance)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._ctx.__exit__(*exc)
            self._bar.stop()


# --------------------------------------------------------------------------- store
def _add_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect embedding stores")
    ss = p.add_subparsers(dest="store_command", metavar="ACTION", parser_class=_Parser)
    ss.required = True
    info = ss.add_parser("info", help="show a store's metadata")
    info.add_argument("store", metavar="STORE")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_run_store_info)
    verify = ss.add_parser("verify", help="check completeness, shapes, key and finite values")
    verify.add_argument("store", metavar="STORE")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=_run_store_verify)
    ls = ss.add_parser("ls", help="list stores under a root")
    ls.add_argument("root", nargs="?", metavar="ROOT", help="default $CARROT_HOME/stores")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_run_store_ls)


def _run_store_info(args: argparse.Namespace) -> int:
    from stores import open_store

    store = open_store(args.store, require_complete=False)
    info = {
        "store": store.url,
        "complete": store.complete,
        "n": store.n,
        "dim": store.dim,
        "views": store.views,
        "dtype": store.dtype,
        "classes": len(store.class_names),
        "splits": {s: len(store.labels(s)) for s in store.splits()},
        "key": store.key,
        **{k: v for k, v in store.attrs.items() if k not in ("skipped",)},
        "skipped": [s["id"] for s in store.attrs.get("skipped", [])],
    }
    if args.json:
        print(json.dumps(info, default=str))
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")
    return 0


def _run_store_verify(args: argparse.Namespace) -> int:
    from stores import verify_store
    from stores.location import require_store, resolve

    # no store at all is a usage error (exit 2); a broken one is reported (exit 1)
    require_store(resolve(args.store))
    report = verify_store(args.store)
    if args.json:
        print(json.dumps({"store": args.store, "ok": report.ok, "problems": report.problems}))
    elif report.ok:
        print(f"ok       {args.store}")
    else:
        for problem in report.problems:
            print(f"problem  {problem}")
    return 0 if report.ok else 1


def _run_store_ls(args: argparse.Namespace) -> int:
    from pipeline.embed.run import default_root
    from stores import list_stores

    rows = list_stores(args.root or default_root())
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], default=str))
        return 0
    for r in rows:
        mark = "complete" if r.complete else "INCOMPLETE"
        print(f"{r.url}  {r.dataset}  {r.backbone}  N={r.n} D={r.dim}  {mark}")
    return 0


# --------------------------------------------------------------------------- server
def _add_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="a local Prefect server and a warm runner, so commands start fast",
        description="start: a Prefect server on 127.0.0.1 (database under $CARROT_HOME/prefect) "
        "and a runner that has imported torch, timm and Prefect once; every carrot command then "
        "records its flow runs there and, when its code and settings match, runs in the runner "
        "(CARROT_RUNNER=0 opts out). stop: both. status: exit 0 when both are up.",
    )
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument(
        "--port", type=positive_int, default=None, help="API port (default 4270; start only)"
    )
    p.add_argument("--no-ui", action="store_true", help="start without the Prefect UI")
    p.set_defaults(run=_run_server)


def _run_server(args: argparse.Namespace) -> int:
    from flows import runner

    if args.action == "start":
        try:
            state = runner.start(args.port or runner.DEFAULT_PORT, ui=not args.no_ui)
        except RuntimeError as e:
            raise InputError(str(e)) from None
        print(f"carrot server up: Prefect API {state['api_url']}, runner pid {state['runner_pid']}")
        if state.get("ui"):
            print(f"  ui    {state['api_url'].removesuffix('/api')}")
        print("  stop  carrot server stop")
        return 0
    if args.action == "stop":
        print("carrot server stopped" if runner.stop() else "carrot server was not running")
        return 0
    st = runner.status()
    if not (st["api"] and st["runner"]):
        print("carrot server: not running (start it with 'carrot server start')")
        return 1
    note = "" if st["current"] else " — code or settings changed since start: commands run on "
    note += "their own until 'carrot server stop' and 'start'" if note else ""
    print(f"carrot server: up, Prefect API {st['api_url']}, {st['served']} commands served{note}")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carrot`` console script."""
    debug = os.environ.get("CARROT_DEBUG") == "1"
    if argv is None:  # the console script: the warm runner when `carrot server` is up
        from flows.runner import forward

        code = forward(sys.argv[1:])
        if code is not None:
            return code
    apply_defaults()  # before Prefect is imported: quiet, offline-safe (the user's settings win)
    try:
        args = build_parser().parse_args(argv)
        _refuse_empty_values(args)
        return int(args.run(args) or 0)
    except UsageError as e:
        print(printable(e), file=sys.stderr)
        return 2
    except USAGE_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"carrot: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "carrot: interrupted (a resumable store can be continued by re-running)",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        mapped = storage_error(e, _failed_path(e), then="what was written whole is kept")
        if mapped is None:
            return _unexpected(e, debug)
        if debug:
            traceback.print_exc()
        print(f"carrot: error: {printable(mapped)}", file=sys.stderr)
        return 2


def _refuse_empty_values(args: argparse.Namespace) -> None:
    """An option or argument given as ``''`` names nothing: refuse it rather than read it as
    "the default" or the current folder."""
    for dest, value in vars(args).items():
        if value != "":
            continue
        if dest in getattr(args, "positionals", ()):
            raise InputError(f"{dest.upper()} '': empty; give one")
        option = "--" + dest.replace("_", "-")
        raise InputError(f"{option} '': empty; give a value, or leave the option out")


def _failed_path(e: BaseException) -> str:
    """The file a write failure names, or a general phrase."""
    failure = write_failure(e)
    name = getattr(failure, "filename", None)
    return repr(str(name)) if name else "the output"


def _unexpected(e: BaseException, debug: bool) -> int:
    """A bug or an unforeseen failure: one line (a traceback with CARROT_DEBUG=1), exit 1."""
    if debug:
        traceback.print_exc()
    print(
        f"carrot: error: {type(e).__name__}: {printable(e)} (CARROT_DEBUG=1 for a traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
