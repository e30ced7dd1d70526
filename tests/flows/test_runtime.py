"""The temporary Prefect server of a command dies with the command, however the command ends."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

# A command that runs a real flow on the temporary server and waits inside it.
_COMMAND = """
import sys, time
from flows.runtime import apply_defaults, flow_settings
apply_defaults()  # the CLI's Prefect defaults, before Prefect is imported
from prefect import flow

@flow
def tiny(wait_s: float) -> int:
    print("in flow", flush=True)
    time.sleep(wait_s)
    return 1

with flow_settings():
    tiny(float(sys.argv[1]))
print("done", flush=True)
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process checks need Linux")


def _start(tmp_path: Path, wait_s: float, home: str = "prefect") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / home)
    return subprocess.Popen(
        [sys.executable, "-c", _COMMAND, str(wait_s)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _wait_for_line(proc: subprocess.Popen, line: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            got = proc.stdout.readline()
            if got.strip() == line:
                return
            if not got:
                break
    raise AssertionError(f"the command never printed {line!r} (exit {proc.poll()})")


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.1)
    return [p for p in procs if not _gone(p)]


def _port(server: psutil.Process) -> int:
    cmd = server.cmdline()
    return int(cmd[cmd.index("--port") + 1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(proc: subprocess.Popen) -> tuple[psutil.Process, list[psutil.Process]]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    servers = [k for k in kids if "uvicorn" in " ".join(k.cmdline())]
    assert len(servers) == 1, [k.cmdline() for k in kids]
    return servers[0], kids


def _cleanup(procs: list[psutil.Process]) -> None:
    for p in procs:
        if not _gone(p):
            p.kill()


def test_kill_9_of_the_command_stops_its_temporary_server(tmp_path):
    proc = _start(tmp_path, wait_s=120)
    kids: list[psutil.Process] = []
    try:
        _wait_for_line(proc, "in flow")
        server, kids = _children(proc)
        port = _port(server)
        assert _listening(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        left = _wait_gone(kids, timeout=8)
        assert not left, f"still running after kill -9: {[p.cmdline()[:4] for p in left]}"
        assert not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(kids)


def test_a_command_that_ends_normally_leaves_nothing_running(tmp_path):
    # ... also with a PREFECT_HOME whose parent folders do not exist yet (Prefect alone times
    # out: it creates only the last folder)
    proc = _start(tmp_path, wait_s=0.5, home="new/nested/prefect")
    kids: list[psutil.Process] = []
    try:
        _wait_for_line(proc, "in flow")
        _, kids = _children(proc)
        _wait_for_line(proc, "done")
        assert proc.wait(timeout=30) == 0
        assert not _wait_gone(kids, timeout=8)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(kids)


def test_the_temporary_server_may_take_two_minutes_to_start_and_the_user_setting_wins(
    monkeypatch,
):
    """Prefect's 20 s start-up wait failed commands beside other work; the CLI waits 120 s
    unless the user chose otherwise (and Prefect reads the value)."""
    from flows.runtime import apply_defaults

    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.setenv("CARROT_RUNNER", "0")
    monkeypatch.delenv(name, raising=False)
    apply_defaults()
    assert os.environ[name] == "120"
    monkeypatch.setenv(name, "7")
    apply_defaults()
    assert os.environ[name] == "7"
    from prefect.settings import Settings

    assert Settings().server.ephemeral.startup_timeout_seconds == 7
