"""Prefect runtime defaults for a command-line tool: offline-safe, quiet, no heartbeat wait, and
a temporary server that dies with the command.

Call `apply_defaults` before ``prefect`` is imported (``flows.cli.main`` does), so the environment
defaults take effect. A user's own settings (``PREFECT_API_URL``, log levels) win over these defaults.

Why a watchdog: without ``PREFECT_API_URL`` Prefect starts a temporary server as a child process
(``prefect.server.api.server.SubprocessASGIServer``: ``subprocess.Popen`` of uvicorn, stopped by an
``atexit`` hook). A ``kill -9`` of the command runs no ``atexit`` hook, so the server (about 200 MB)
lived on, re-parented to PID 1. Prefect's ``Popen`` takes no ``preexec_fn``, so the child cannot be
given ``PR_SET_PDEATHSIG`` without copying or patching Prefect's code (and ``PDEATHSIG`` fires when
the *thread* that started the child ends, not the process). Instead `flow_settings` starts the
server itself, from the calling thread, as the instance Prefect then reuses, and starts a small
watchdog process that waits on the command's and the server's ``pidfd`` (Linux; elsewhere it
polls its parent) and stops the server (SIGTERM, SIGKILL after 5 s) as soon as the command is
gone, however it ended. The watchdog exits with the server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # the temporary server logs cancelled-event tracebacks when the process exits
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Prefect's console handler for CRITICAL only: the CLI prints failures itself, on one line
    # (runs still log to the Prefect API; PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL=INFO shows them)
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    # the temporary server takes 5-10 s to answer on an idle 2-core machine and more than
    # Prefect's 20 s beside other work (a failed command: "Timed out while attempting to connect
    # to ephemeral Prefect API server"); wait up to 2 minutes
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_defaults() -> None:
    """Set quiet, offline-safe Prefect environment defaults (never overriding the user's), and
    ``PREFECT_API_URL`` to the ``carrot server`` when one is up and the user set none."""
    for name, value in _DEFAULTS.items():
        os.environ.setdefault(name, value)
    if "PREFECT_API_URL" not in os.environ:
        from flows.runner import server_url

        url = server_url()
        if url:
            os.environ["PREFECT_API_URL"] = url


@contextlib.contextmanager
def flow_settings() -> Iterator[None]:
    """Run flows without the heartbeat thread (its join costs ~1 s per sync flow run), on a
    temporary server that cannot outlive this process (see `start_guarded_server`)."""
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        start_guarded_server()
        yield


# The watchdog: argv = [command pid, server pid]. Runs with -I -S (no site, ~20 ms to start).
_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; we clean up after it
parent, server = int(sys.argv[1]), int(sys.argv[2])
def pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
pfd, sfd = pidfd(parent), pidfd(server)
def alive(pid, fd):
    if fd is not None:
        return not select.select([fd], [], [], 0)[0]
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
if pfd is not None and sfd is not None and os.getppid() == parent:
    if sfd in select.select([pfd, sfd], [], [])[0]:
        sys.exit(0)  # the server stopped first: the command is ending normally
else:
    while os.getppid() == parent and alive(server, sfd):
        time.sleep(0.2)
def send(sig):
    try:
        if sfd is not None:
            signal.pidfd_send_signal(sfd, sig)
        else:
            os.kill(server, sig)
    except (ProcessLookupError, OSError):
        pass
send(signal.SIGTERM)
deadline = time.monotonic() + 5.0
while alive(server, sfd) and time.monotonic() < deadline:
    time.sleep(0.05)
if alive(server, sfd):
    send(signal.SIGKILL)
"""

_guarded: dict[int, subprocess.Popen] = {}  # server pid → its watchdog (one per server)


def start_guarded_server() -> int | None:
    """When flows will use Prefect's temporary local server (no API URL configured), start it
    now and start its watchdog, so that it stops when this process ends in any way (kill -9
    included). Returns the server's pid, or None when a configured server is used."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    try:  # Prefect creates only the last folder of PREFECT_HOME, then times out without it
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from pipeline.errors import InputError

        raise InputError(
            f"PREFECT_HOME {str(settings.home)!r} cannot be created ({e.strerror}); set "
            "PREFECT_HOME to a writable folder, or PREFECT_API_URL to a running Prefect server"
        ) from None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use (one per process)
    server.start()
    process = server.server_process
    if process is None:
        return None
    if process.pid not in _guarded:
        _guarded[process.pid] = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(process.pid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(_stop_at_exit, server, process.pid)
    return process.pid


def _stop_at_exit(server, pid: int) -> None:
    """Normal exit: stop the server now (Prefect's own atexit hook would, just after this) and
    reap its watchdog, which then has nothing left to do."""
    server.stop()
    watchdog = _guarded.pop(pid, None)
    if watchdog is not None:
        try:
            watchdog.wait(timeout=2)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()


def tracking_server() -> str:
    """Where flow runs are recorded: the configured API or a temporary local server."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url or "temporary local server (set PREFECT_API_URL to keep runs)"
