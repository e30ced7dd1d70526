"""``carrot serve``: against a real Prefect server on loopback (its database in a temporary
folder), a sweep deployment on a short interval with ``--limit 1`` runs on schedule, completes
with its artifacts, pauses its schedule and exits by itself; and, without a server, the usage
errors: one line, exit 2, before anything is served."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import runner
from flows.cli import main

CARROT = str(Path(sys.executable).with_name("carrot"))
SPEC = """version = 1
data = "sklearn:digits"
backbones = ["test_vit"]
augs = ["none"]
image_size = 32
"""
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}/{path}", timeout=10) as r:
        return json.loads(r.read())


def _stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), SIGKILL after."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_serve_runs_a_scheduled_sweep_on_a_real_server_and_stops(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CARROT_"))}
    (tmp_path / "server").mkdir()
    server_env = base | QUIET | {"PREFECT_HOME": str(tmp_path / "server")}
    args = ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", *args, "--analytics-off"],
        env=server_env,
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=open(tmp_path / "server.log", "wb"),  # noqa: SIM115  (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    serve = None
    try:
        deadline = time.monotonic() + 60
        while not runner.api_healthy(api):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Prefect server did not come up in 60 s"
            time.sleep(0.25)

        (tmp_path / "sweep.toml").write_text(SPEC + f'root = "{tmp_path / "stores"}"\n')
        env = dict(
            base,
            **QUIET,
            PREFECT_API_URL=api,
            PREFECT_HOME=str(tmp_path / "client"),
            CARROT_HOME=str(tmp_path / "home"),
            CARROT_RUNNER="0",
            HF_HUB_OFFLINE="1",
        )
        argv = ["serve", "--config", "sweep.toml", "--interval", "5", "--limit", "1"]
        t0 = time.monotonic()
        serve = subprocess.Popen(
            [CARROT, *argv],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        out, err = serve.communicate(timeout=150)  # exits by itself after its one run
        seconds = time.monotonic() - t0
        assert serve.returncode == 0, out + err
        assert "serving  scheduled-sweep/sweep  every 5 s" in out and "Completed" in out, out
        with pytest.raises(ProcessLookupError):  # nothing of the serve is left running
            os.killpg(serve.pid, 0)

        deployments = _post(api, "deployments/filter", {})
        assert [(d["name"], d["paused"]) for d in deployments] == [("sweep", True)]
        deployment = deployments[0]
        assert deployment["parameters"]["config"] == str(tmp_path / "sweep.toml")
        runs = _post(api, "flow_runs/filter", {"limit": 200})
        done = [
            r
            for r in runs
            if r["deployment_id"] == deployment["id"] and r["state_type"] == "COMPLETED"
        ]
        assert len(done) >= 1, [(r["name"], r["state_type"]) for r in runs]
        assert not [r for r in runs if r["state_type"] in ("RUNNING", "PENDING", "CANCELLED")]
        artifacts = {a["key"]: a for a in _post(api, "artifacts/filter", {"limit": 50})}
        assert {"sweep-table", "sweep-summary", "sweep-chart"} <= set(artifacts)
        # ... made by the sweep subflow of the completed scheduled run
        sweep_run = _get(api, f"flow_runs/{artifacts['sweep-table']['flow_run_id']}")
        parent_task = _get(api, f"task_runs/{sweep_run['parent_task_run_id']}")
        assert parent_task["flow_run_id"] in {r["id"] for r in done}
        assert (tmp_path / "home" / "sweeps").is_dir()
        print(f"carrot serve --limit 1: {seconds:.1f} s from start to exit")
    finally:
        if serve is not None:
            _stop_group(serve)
        _stop_group(server)
    assert server.returncode is not None and not runner.api_healthy(api)


# --------------------------------------------------------------------------- no server
def _refused(capsys, argv: list[str], *needles: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, out, err)
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "serving" not in out
    return lines[0]


@pytest.fixture
def no_server(tmp_path, monkeypatch):
    """No PREFECT_API_URL, no carrot server; a valid spec file in the working directory."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("CARROT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.toml").write_text(SPEC)
    return tmp_path


def test_serve_without_a_server_names_carrot_server_start(no_server, capsys):
    line = _refused(capsys, ["serve", "--config", "sweep.toml", "--cron", "0 2 * * *"])
    assert "carrot server start" in line and "PREFECT_API_URL" in line


def test_bad_cron_is_one_line_naming_the_option(no_server, capsys):
    _refused(capsys, ["serve", "--config", "sweep.toml", "--cron", "61 2 * * *"], "--cron")
    _refused(capsys, ["serve", "--config", "sweep.toml", "--cron", "every night"], "--cron")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--cron", "0 2 * * *", "--", "predict", "STORE", "--head", "h"], ["'predict'", "embed"]),
        (["--cron", "0 2 * * *", "--", "serve", "--interval", "5"], ["'serve'", "train"]),
        (["--cron", "0 2 * * *", "--", "embed", "sklearn:digits"], ["--backbone"]),
        (["--cron", "0 2 * * *"], ["nothing to serve"]),
        (["--config", "sweep.toml"], ["--cron", "--interval"]),
        (["--config", "sweep.toml", "--cron", "0 2 * * *", "--interval", "5"], ["not allowed"]),
        (["--config", "sweep.toml", "--interval", "0"], ["--interval"]),
        (["--config", "missing.toml", "--interval", "5"], ["missing.toml"]),
        (["--interval", "5", "--out", "x", "--", "train", "STORE"], ["--out"]),
    ],
)
def test_bad_serve_input_is_refused_before_serving(no_server, capsys, argv, needles):
    _refused(capsys, ["serve", *argv], *needles)


def test_deployments_carry_json_parameters_and_the_schedule(no_server):
    from flows.serve import build_deployments

    (sweep,) = build_deployments(config="sweep.toml", cron="0 2 * * *", out="out")
    assert (sweep.flow_name, sweep.name) == ("scheduled-sweep", "sweep")
    assert sweep.parameters == {
        "config": str(no_server / "sweep.toml"),
        "out": str(no_server / "out"),
        "cwd": str(no_server),
    }
    assert sweep.schedules[0].schedule.cron == "0 2 * * *"
    assert sweep.entrypoint == "flows.serve.scheduled_sweep"
    argv = ["embed", "sklearn:digits", "--backbone", "resnet18"]
    (command,) = build_deployments(argv=argv, interval=30, name="nightly")
    assert (command.flow_name, command.name) == ("scheduled-command", "nightly")
    assert command.parameters == {"argv": argv, "cwd": str(no_server)}
    assert command.schedules[0].schedule.interval.total_seconds() == 30
    json.dumps(sweep.parameters | command.parameters)  # JSON all the way


def test_the_command_may_follow_with_or_without_the_double_dash():
    from flows.cli import build_parser
    from flows.cli_serve import served_command

    parser = build_parser()
    command = ["embed", "sklearn:digits", "--backbone", "test_vit", "--image-size", "32"]
    for argv in (["--", *command], command):
        args = parser.parse_args(["serve", "--interval", "5", "--limit", "1", *argv])
        assert served_command(args) == command
        assert args.limit == 1 and args.interval == 5
