"""``carrot server``: a real Prefect server on loopback and the warm runner, through the real
console script — commands forwarded to the runner, recorded by the server, with their exit
codes and one-line errors; not forwarded when settings differ or ``CARROT_RUNNER=0``; and
nothing left running after ``stop``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import runner

CARROT = shutil.which("carrot") or str(Path(sys.executable).with_name("carrot"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "CARROT_RUNNER")}
    return env | {"CARROT_HOME": str(home), **extra}


def _carrot(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CARROT, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=env["HOME"]
    )


def _flow_runs(api_url: str) -> list[dict]:
    request = urllib.request.Request(
        f"{api_url}/flow_runs/filter",
        data=json.dumps({"limit": 200}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _served(env: dict[str, str]) -> int:
    out = _carrot(env, "server", "status").stdout
    return int(out.split(" commands served")[0].rsplit(" ", 1)[1])


@pytest.mark.slow
def test_server_runs_commands_warm_and_records_them(tmp_path):
    home = tmp_path / "home"
    env = _env(home, HOME=str(tmp_path))
    port = _free_port()
    started = _carrot(env, "server", "start", "--port", str(port), "--no-ui")
    try:
        assert started.returncode == 0, started.stderr
        state = json.loads((home / "run" / "server.json").read_text())
        api = state["api_url"]
        assert api == f"http://127.0.0.1:{port}/api" and runner.api_healthy(api)
        base = api.removesuffix("/api")
        with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as r:
            assert json.loads(r.read())["api_url"] == api  # the UI asks this port, not 4200
        assert _carrot(env, "server", "start").returncode == 0  # already up: a no-op
        assert _served(env) == 0

        first = _carrot(env, "embed", "sklearn:digits", "--backbone", "test_vit")
        assert first.returncode == 0, first.stderr
        t0 = time.perf_counter()
        hit = _carrot(env, "embed", "sklearn:digits", "--backbone", "test_vit")
        warm_s = time.perf_counter() - t0
        assert hit.returncode == 0 and "cache hit" in hit.stdout, hit.stdout + hit.stderr
        assert _served(env) == 2  # both ran in the runner's children
        bad = _carrot(env, "embed", "sklearn:digits", "--backbone", "no_such_backbone_xyz")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        assert "no_such_backbone_xyz" in bad.stderr and "Traceback" not in bad.stderr
        assert _served(env) == 3
        runs = _flow_runs(api)
        assert sum(r["state_type"] == "COMPLETED" for r in runs) >= 2

        # opted out (as with settings that differ from the runner's): its own process, and
        # still recorded by the server
        opted_out = _carrot(
            dict(env, CARROT_RUNNER="0"), "embed", "sklearn:digits", "--backbone", "test_vit"
        )
        assert opted_out.returncode == 0 and _served(env) == 3
        assert len(_flow_runs(api)) == len(runs) + 1

        # Ctrl-C in the caller stops the forwarded command (exit 130); the runner lives on
        proc = subprocess.Popen(
            [CARROT, "embed", "sklearn:digits", "--backbone", "resnet18"],  # ~30 s of work
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(5)  # inside the embed flow
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # Python drops a KeyboardInterrupt raised inside an at-fork hook ("Exception ignored
            # in _releaseLock") when the signal lands as the loader forks its workers; a user
            # presses Ctrl-C again, and so does this test
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, out, err)
        assert _served(env) == 4
        print(f"warm cache-hit command: {warm_s:.2f} s wall")
    finally:
        stopped = _carrot(env, "server", "stop")
    assert stopped.returncode == 0
    assert not runner.api_healthy(f"http://127.0.0.1:{port}/api")
    with pytest.raises(OSError):
        os.kill(int(state["runner_pid"]), 0)
    status = _carrot(env, "server", "status")
    assert status.returncode == 1 and "not running" in status.stdout
    assert not (home / "run" / "server.json").exists()


def test_forward_declines_without_a_matching_runner(tmp_path, monkeypatch):
    monkeypatch.setenv("CARROT_HOME", str(tmp_path))
    assert runner.forward(["embed", "x"]) is None  # no server record
    (tmp_path / "run").mkdir()
    record = {
        "python": runner.interpreter(),
        "settings": runner.settings_fingerprint(),
        "code": runner.code_fingerprint(),
        "socket": str(tmp_path / "run" / "runner.sock"),  # nobody listens
    }
    runner.state_path().write_text(json.dumps(record))
    assert runner.forward(["embed", "x"]) is None  # the socket does not answer
    for key, value in (("python", "/other/python|/other"), ("code", "0"), ("settings", {})):
        runner.state_path().write_text(json.dumps(record | {key: value}))
        assert runner.forward(["embed", "x"]) is None
    assert runner.forward(["server", "status"]) is None  # never forwarded
    monkeypatch.setenv("CARROT_RUNNER", "0")
    assert runner.forward(["embed", "x"]) is None


def test_settings_fingerprint_keeps_what_a_run_depends_on():
    env = {
        "PREFECT_API_URL": "http://x/api",
        "PREFECT_HOME": "/p",
        "CARROT_HOME": "/c",
        "CUDA_VISIBLE_DEVICES": "0",
        "TERM": "xterm",
    }
    fp = runner.settings_fingerprint(env)
    assert fp["CARROT_HOME"] == "/c" and fp["CUDA_VISIBLE_DEVICES"] == "0"
    assert "PREFECT_API_URL" not in fp and "PREFECT_HOME" not in fp and "TERM" not in fp
    assert fp["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "CRITICAL"  # the CLI's own default
    assert runner.hash_text("abc") == runner.hash_text("abc") != runner.hash_text("abd")
