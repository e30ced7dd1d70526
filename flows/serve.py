"""``carrot serve``: scheduled runs of carrot's flows, served to a real Prefect server.

Deployment parameters must be JSON, and the stage flows take dataclasses, so two small flows
stand in front of them:

* ``scheduled-sweep(config, out, cwd)`` reads the sweep.toml at run time (an edit applies to the
  next run) and runs the ``sweep`` flow as a subflow (its table, summary and chart artifacts);
* ``scheduled-command(argv, cwd)`` runs a ``carrot embed …`` or ``carrot train …`` command line,
  whose ``embed`` / ``train-head`` flow is a subflow.

`serve` registers their deployments with a schedule and runs a Prefect ``Runner`` that starts
each due run in its own process (``python -m prefect.engine``), one at a time. With ``limit``
it stops after that many runs have finished (see `_stop_after`); otherwise on Ctrl-C or
SIGTERM. Either way the deployments' schedules are paused on the way out (Prefect's
``pause_on_shutdown``), so nothing piles up while nobody serves them.

The temporary server that Prefect starts without ``PREFECT_API_URL`` runs no scheduler, so
`require_server` insists on a configured one (``carrot server start``, or ``PREFECT_API_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from pipeline.errors import InputError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner import Runner

SERVABLE_COMMANDS = ("embed", "train")
_WATCH_SECONDS = 1.0  # how often `_stop_after` looks at the runs


# ----------------------------------------------------------------------------- flows
@contextlib.contextmanager
def _in_folder(cwd: str | None) -> Iterator[None]:
    """Run with ``cwd`` as the working directory (relative paths as where serve started)."""
    if not cwd:
        yield
        return
    with contextlib.chdir(cwd):
        yield


@flow(name="scheduled-sweep", log_prints=False)
def scheduled_sweep(config: str, out: str | None = None, cwd: str | None = None) -> dict:
    """Read the sweep spec ``config`` now and run the ``sweep`` flow on it; ``out`` overrides
    the spec's output folder. Fails when every backbone failed (as ``carrot sweep`` does)."""
    from flows.sweep import sweep_flow
    from pipeline.evaluation.sweep import SweepSpec, default_out

    with _in_folder(cwd):
        spec = SweepSpec.from_toml(config, out=out)
        target = str(Path(spec.out).resolve()) if spec.out else str(default_out(spec))
        result = sweep_flow(spec, target)
    rows = result["rows"]
    failed = [r for r in rows if r.get("error")]
    if rows and len(failed) == len(rows):
        raise InputError(f"scheduled sweep: every backbone failed; first: {failed[0]['error']}")
    return {"out": result["out"], "files": result["files"], "rows": len(rows)}


@flow(name="scheduled-command", log_prints=False)
def scheduled_command(argv: list[str], cwd: str | None = None) -> dict:
    """Run the carrot command line ``argv`` (``embed …`` or ``train …``) in ``cwd``."""
    args = parse_command(argv)
    with _in_folder(cwd):
        code = int(args.run(args) or 0)
    if code != 0:
        raise RuntimeError(f"carrot {' '.join(argv)} exited with {code}")
    return {"command": list(argv), "exit": code}


def parse_command(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed by the ``carrot`` parser; only `SERVABLE_COMMANDS` (InputError else)."""
    allowed = " or ".join(f"'{c} …'" for c in SERVABLE_COMMANDS)
    if not argv:
        raise InputError(f"carrot serve: no command after '--'; give {allowed}")
    if argv[0] not in SERVABLE_COMMANDS:
        raise InputError(
            f"carrot serve: cannot serve {argv[0]!r}; the commands it serves are {allowed} "
            "(after '--'), and sweeps with --config sweep.toml"
        )
    from flows.cli import UsageError, build_parser

    try:
        return build_parser().parse_args(list(argv))
    except UsageError as e:
        raise InputError(f"carrot serve -- {' '.join(argv)}: {e}") from None
    except SystemExit:  # --help: printed, nothing to serve
        raise InputError(f"carrot serve: give the command to serve, not {argv[-1]!r}") from None


# ----------------------------------------------------------------------------- checks
def check_cron(expr: str) -> str:
    """``expr`` when Prefect accepts it as a cron schedule; else an InputError naming --cron."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=expr)
    except ValueError:  # pydantic's ValidationError is one
        raise InputError(
            f"--cron {expr!r}: not a cron expression; give five fields, minute hour day month "
            'weekday (UTC), e.g. "0 2 * * *" for 02:00 every day'
        ) from None
    return expr


def require_server() -> str:
    """The API URL to serve to: ``PREFECT_API_URL``, else the running ``carrot server``.
    InputError when there is none (Prefect's temporary server runs no scheduler) or when a
    loopback URL does not answer."""
    from flows.runner import api_healthy, server_url

    url = os.environ.get("PREFECT_API_URL") or server_url()
    if not url:
        raise InputError(
            "carrot serve needs a Prefect server that runs schedules (the temporary one runs "
            "none): run 'carrot server start', or set PREFECT_API_URL to a Prefect server"
        )
    if not os.environ.get("PREFECT_API_KEY") and not api_healthy(url, timeout=5):
        raise InputError(
            f"PREFECT_API_URL {url}: no Prefect API answers there; run 'carrot server start' "
            "(and unset PREFECT_API_URL), or start that server"
        )
    return url


# ----------------------------------------------------------------------------- serving
def build_deployments(
    *,
    config: str | None = None,
    argv: Sequence[str] = (),
    name: str | None = None,
    cron: str | None = None,
    interval: float | None = None,
    out: str | None = None,
) -> list[RunnerDeployment]:
    """One deployment per job: the sweep of ``config`` and/or the command ``argv``, each on
    the schedule ``cron`` or every ``interval`` seconds. Paths are made absolute, and runs
    start in this folder, so a run does not depend on where its process starts."""
    from prefect.deployments.runner import EntrypointType

    if (cron is None) == (interval is None):
        raise InputError("carrot serve: give exactly one of --cron EXPR and --interval SECONDS")
    when: dict[str, Any] = {"cron": check_cron(cron)} if cron else {"interval": interval}
    cwd = os.getcwd()
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["carrot"], **when}
    deployments = []
    if config:
        from pipeline.evaluation.sweep import SweepSpec

        path = str(Path(config).resolve())
        SweepSpec.from_toml(path, out=out)  # a bad spec is refused now, not at 2 am
        params = {"config": path, "out": str(Path(out).resolve()) if out else None, "cwd": cwd}
        deployments.append(
            scheduled_sweep.to_deployment(
                name=name or Path(config).stem, parameters=params, **common
            )
        )
    elif out:
        raise InputError("--out is the sweep's output folder: give it with --config sweep.toml")
    if argv:
        parse_command(argv)
        deployments.append(
            scheduled_command.to_deployment(
                name=name or argv[0], parameters={"argv": list(argv), "cwd": cwd}, **common
            )
        )
    if not deployments:
        raise InputError(
            "carrot serve: nothing to serve; give --config sweep.toml, or a command after "
            "'--' (carrot serve --cron \"0 2 * * *\" -- embed DATA --backbone NAME)"
        )
    return deployments


@dataclass
class Served:
    """What a `serve` did: with a ``limit``, the runs it started (oldest first, each final);
    ``interrupted`` when Ctrl-C stopped it."""

    runs: list[FlowRun] = field(default_factory=list)
    interrupted: bool = False


def serve(
    deployments: Sequence[RunnerDeployment],
    *,
    limit: int | None = None,
    poll_seconds: float | None = None,
) -> Served:
    """Serve ``deployments`` (their runs one at a time) until ``limit`` runs have finished, or
    until Ctrl-C / SIGTERM."""
    return asyncio.run(_serve(list(deployments), limit=limit, poll_seconds=poll_seconds))


async def _serve(
    deployments: list[RunnerDeployment], *, limit: int | None, poll_seconds: float | None
) -> Served:
    from prefect.runner import Runner

    runner = Runner(
        name=f"carrot-serve-{os.getpid()}",
        query_seconds=poll_seconds,
        limit=1,  # one run at a time: two sweeps would contend for the same stores and rows
        pause_on_shutdown=True,
    )
    ids = [await runner.aadd_deployment(d) for d in deployments]
    finished: list[FlowRun] = []
    watcher = None
    if limit is not None:
        from prefect import get_client

        async with get_client() as client:  # runs that started before this serve
            before = {r.id for r in await _picked_runs(client, ids)}
        watcher = asyncio.create_task(_stop_after(runner, ids, before, limit, finished))
    interrupted = _stop_on_ctrl_c(runner)
    try:
        await runner.start()  # returns once stopped: by the watcher, Ctrl-C or SIGTERM
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        if watcher is not None and not watcher.done():
            watcher.cancel()
    if watcher is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await watcher  # re-raises the watcher's error, if it had one
    return Served(runs=finished, interrupted=interrupted.is_set())


def _stop_on_ctrl_c(runner: Runner) -> asyncio.Event:
    """The first Ctrl-C stops ``runner`` as SIGTERM does (a run in flight is cancelled and
    recorded so, the schedules paused); a second one interrupts at once. Returns the event
    that says it happened."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def stop() -> None:
        while not runner.started:
            await asyncio.sleep(0.05)
        await runner.astop()

    def on_interrupt() -> None:
        interrupted.set()
        loop.remove_signal_handler(signal.SIGINT)  # the next Ctrl-C: KeyboardInterrupt
        task = loop.create_task(stop())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not Unix/main
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    return interrupted


async def _picked_runs(client, ids: list) -> list[FlowRun]:
    """The newest runs of ``ids`` that left the Scheduled state (started, or over)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=ids),
            state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])),
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        limit=200,
    )


async def _stop_after(
    runner: Runner, ids: list, before: set, limit: int, finished: list[FlowRun]
) -> None:
    """Stop ``runner`` once ``limit`` of its runs have finished (``before``: runs of ``ids``
    that had started before it served).

    Prefect's own ``limit`` is a concurrency limit, so this watches the API: a run of the
    deployments that leaves the Scheduled state after serving began was started by this
    runner. Once ``limit`` have started, the runner takes no more (its poller stops
    submitting; the schedules are paused, which also drops future scheduled runs); once every
    started run is final and its process has exited (the runner has its slot back), the runner
    stops. No run is cancelled: a run started in the instant before the gate closed finishes
    too (at most one more, as runs go one at a time)."""
    from prefect import get_client

    while not runner.started:
        await asyncio.sleep(0.1)
    try:
        async with get_client() as client:
            gated = False
            while True:
                await asyncio.sleep(_WATCH_SECONDS)
                started = [r for r in await _picked_runs(client, ids) if r.id not in before]
                if len(started) >= limit and not gated:
                    gated = True
                    poller = getattr(runner, "_scheduled_run_poller", None)
                    if poller is not None:
                        poller.stopping = True
                    for deployment_id in ids:
                        await client.pause_deployment(deployment_id)
                if (
                    gated
                    and all(r.state is not None and r.state.is_final() for r in started)
                    and runner.has_slots_available()
                ):
                    finished.extend(reversed(started))  # oldest first
                    return
    finally:
        if runner.started:  # done, or the watcher failed: stop serving either way
            await runner.astop()
