"""``carrot server``: one local Prefect server plus a warm runner, so commands start fast.

Why: a new ``carrot`` process spends seconds importing torch, timm, scikit-learn and Prefect, and
without ``PREFECT_API_URL`` several more starting Prefect's temporary server. ``carrot server
start`` starts, in the background,

* a Prefect server on loopback (``prefect server start --background``; its database under
  ``$CARROT_HOME/prefect``), which every command then records its flow runs in, and
* the runner: a process that has imported everything once and listens on a Unix socket
  (``$CARROT_HOME/run/runner.sock``). A command hands it its arguments, working directory,
  environment and its own stdin/stdout/stderr (file descriptors passed over the socket); the
  runner forks a child that runs the command exactly as ``carrot`` would, writing straight to
  the caller's terminal, and reports the exit code back. Ctrl-C in the caller reaches the child.

A command runs through the runner only when nothing it depends on differs: the same Python
interpreter, the same source files (size and mtime of every module of ``flows``, ``pipeline``,
``stores``) and installed packages (the site-packages folder's mtime), and the same settings (every ``PREFECT_*``, ``CARROT_*``, ``CUDA_*``, ``HF_*``,
``TORCH*``, ``OMP_*``, ``MKL_*``, ``PYTHON*`` variable). Otherwise — or with ``CARROT_RUNNER=0``
— it runs in its own process, still against the server while the server is up. State lives in
``$CARROT_HOME/run/server.json``.

This module's client side imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.home import carrot_home

DEFAULT_PORT = 4270  # not Prefect's 4200: a user's own server there stays untouched
_PREFIXES = ("PREFECT_", "CARROT_", "CUDA_", "HF_", "TORCH", "OMP_", "MKL_", "PYTHON", "PYTORCH")
_PACKAGES = ("flows", "pipeline", "stores")
# What the runner imports once, before it forks a child per command.
_WARM_MODULES = (
    "torch",
    "timm",
    "sklearn.linear_model",
    "prefect",
    "flows.cli",
    "flows.embed",
    "flows.train",
    "flows.demo",
    "flows.sweep",
    "pipeline.embed.run",
    "pipeline.heads.probe",
    "pipeline.heads.predict",
    "stores",
)


# ----------------------------------------------------------------------------- state
def run_dir() -> Path:
    return carrot_home() / "run"


def state_path() -> Path:
    return run_dir() / "server.json"


def read_state() -> dict | None:
    """The running server's record, or None."""
    try:
        return json.loads(state_path().read_text())
    except (OSError, ValueError):
        return None


def api_healthy(api_url: str, timeout: float = 0.5) -> bool:
    """Whether the Prefect API at ``api_url`` (…/api) answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200 and r.read().strip() == b"true"
    except (OSError, ValueError):
        return False


def settings_fingerprint(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables a run depends on (``PREFECT_API_URL`` aside: the server's)."""
    from flows.runtime import _DEFAULTS

    env = dict(os.environ if env is None else env)
    for name, value in _DEFAULTS.items():
        env.setdefault(name, value)
    return {
        k: v
        for k, v in sorted(env.items())
        if k.startswith(_PREFIXES) and k not in ("PREFECT_API_URL", "PREFECT_HOME")
    }


def code_fingerprint() -> str:
    """Size and mtime of every module of the carrot packages, and the mtime of the environment's
    site-packages (installing or removing a package touches it): changes when the code or the
    installed packages do."""
    root = Path(__file__).resolve().parents[1]
    parts = []
    for entry in sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}):
        with contextlib.suppress(OSError):
            parts.append(f"{entry}:{os.stat(entry).st_mtime_ns}")
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            st = path.stat()
            parts.append(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return str(hash_text("\n".join(parts)))


def hash_text(text: str) -> int:
    """A stable 64-bit FNV-1a hash (``hash()`` is salted per process)."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def interpreter() -> str:
    """This Python: the resolved executable and the environment's prefix."""
    return f"{os.path.realpath(sys.executable)}|{sys.prefix}"


def server_url() -> str | None:
    """The API URL of the carrot server when it is up, else None."""
    state = read_state()
    if state and api_healthy(state.get("api_url", "")):
        return state["api_url"]
    return None


# ----------------------------------------------------------------------------- client
def forward(argv: Sequence[str]) -> int | None:
    """Run ``carrot argv`` in the warm runner and return its exit code; None when it cannot run
    there (no runner, another interpreter, changed code or settings, ``CARROT_RUNNER=0``)."""
    if os.environ.get("CARROT_RUNNER") == "0" or (argv and argv[0] == "server"):
        return None
    state = read_state()
    if not state or state.get("python") != interpreter():
        return None
    if state.get("settings") != settings_fingerprint() or state.get("code") != code_fingerprint():
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(state["socket"])
    except (OSError, KeyError):
        return None
    request = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
    with conn:
        try:
            _send(conn, request, fds=[0, 1, 2])
        except OSError:
            return None
        return _await_exit(conn)


def _await_exit(conn: socket.socket) -> int:
    """Relay Ctrl-C/SIGTERM/SIGHUP to the child and wait for its exit code."""
    child: dict[str, int] = {}

    def relay(signum, _frame):
        if "pid" in child:
            with contextlib.suppress(OSError):
                os.kill(child["pid"], signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            message = _receive(conn)
            if message is None:
                print(
                    "carrot: error: the runner's child ended without an exit code", file=sys.stderr
                )
                return 1
            if "pid" in message:
                child["pid"] = int(message["pid"])
            if "exit" in message:
                return int(message["exit"])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _send(conn: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [frame], list(fds))
    else:
        conn.sendall(frame)


def _receive(conn: socket.socket, *, with_fds: int = 0) -> dict | None:
    """One framed JSON message (and up to ``with_fds`` descriptors in ``message["_fds"]``)."""
    fds: list[int] = []
    head = b""
    while len(head) < 4:
        if with_fds and not fds:
            chunk, got, _flags, _addr = socket.recv_fds(conn, 4 - len(head), with_fds)
            fds = list(got)
        else:
            chunk = conn.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    message = json.loads(body)
    if with_fds:
        message["_fds"] = fds
    return message


# ----------------------------------------------------------------------------- runner
def serve(socket_path: str, api_url: str) -> None:
    """The runner's main loop (``python -m flows.runner serve``): import everything, listen,
    fork one child per command. Stops on SIGTERM."""
    from flows.runtime import apply_defaults

    settings = settings_fingerprint()  # the caller's settings, before the runner's own
    os.environ["PREFECT_API_URL"] = api_url
    apply_defaults()  # before Prefect is imported, as `carrot` does
    for name in _WARM_MODULES:
        __import__(name)
    path = Path(socket_path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(0.5)
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _write_state(settings, socket=str(path), api_url=api_url)
    print(f"runner {os.getpid()} ready on {path}", flush=True)
    served = 0
    while not stopping["now"]:
        _reap()
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if stopping["now"]:
                break
            raise
        conn.settimeout(10)
        try:
            request = _receive(conn, with_fds=3)
        except OSError:
            request = None
        if request is None:
            conn.close()
            continue
        fds = request.pop("_fds")
        if request.get("argv") == ["__ping__"]:
            _send(conn, {"exit": 0, "served": served})
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:  # the child: never returns
            listener.close()
            _run_child(conn, request, fds)
        served += 1
        conn.close()
        for fd in fds:
            os.close(fd)
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _run_child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Become the caller's command: its fds, directory and environment; report the exit."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds, strict=False):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        api_url = os.environ["PREFECT_API_URL"]
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["PREFECT_API_URL"] = api_url
        os.chdir(request["cwd"])
        conn.settimeout(None)
        _send(conn, {"pid": os.getpid()})
        from flows.cli import main

        code = int(main(request["argv"]) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # report, then exit: never back to the loop
        print(f"carrot: error: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            _send(conn, {"exit": code})
        os._exit(code)


def _write_state(settings: dict[str, str], **extra: str) -> None:
    state = {
        "python": interpreter(),
        "settings": settings,
        "code": code_fingerprint(),
        "runner_pid": os.getpid(),
        **extra,
    }
    keep = ("prefect_home", "port", "ui")
    state |= {k: v for k, v in (read_state() or {}).items() if k in keep}
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path())


# ----------------------------------------------------------------------------- commands
def _prefect(
    args: Sequence[str], prefect_home: Path, *, ui_api_url: str | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    if ui_api_url is not None:
        env["PREFECT_UI_API_URL"] = ui_api_url
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True, **kwargs
    )


def ping(state: dict, timeout: float = 2.0) -> dict | None:
    """The runner's answer to a ping (``{"exit": 0, "served": n}``), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(state["socket"])
            _send(conn, {"argv": ["__ping__"]}, fds=[0, 1, 2])
            return _receive(conn)
    except (OSError, KeyError, ValueError):
        return None


def start(port: int = DEFAULT_PORT, *, ui: bool = True, timeout: float = 120.0) -> dict:
    """Start the Prefect server and the runner (no-op when both are up); returns the state.
    Raises RuntimeError naming what did not come up."""
    state = read_state()
    if state and api_healthy(state.get("api_url", "")) and ping(state):
        return state
    if state:  # a stale record (crashed or stopped): clear it first
        stop()
    run_dir().mkdir(parents=True, exist_ok=True)
    prefect_home = carrot_home() / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    if api_healthy(api_url):
        raise RuntimeError(
            f"port {port} already serves a Prefect API not started by carrot: stop it, or pass "
            "--port with a free port"
        )
    args = ["server", "start", "--background", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--analytics-off", "--ui" if ui else "--no-ui"]
    # the UI's own API address: Prefect's default names port 4200, whatever --port says
    done = _prefect(args, prefect_home, timeout=60, ui_api_url=api_url)
    if done.returncode != 0:
        raise RuntimeError(f"prefect server start failed: {(done.stderr or done.stdout).strip()}")
    state_path().write_text(json.dumps({"prefect_home": str(prefect_home), "port": port, "ui": ui}))
    _wait(lambda: api_healthy(api_url), timeout, f"the Prefect server on port {port}")
    log = open(run_dir() / "runner.log", "ab")  # noqa: SIM115  (the runner's from now on)
    subprocess.Popen(
        [sys.executable, "-m", "flows.runner", "serve", str(run_dir() / "runner.sock"), api_url],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        env=dict(os.environ, PREFECT_API_URL=api_url),
    )
    log.close()
    _wait(
        lambda: (s := read_state()) is not None and "socket" in s and ping(s), timeout, "the runner"
    )
    return read_state() or {}


def _wait(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (see {run_dir()})")
        time.sleep(0.25)


def stop() -> bool:
    """Stop the runner and the Prefect server; returns whether anything was running."""
    state = read_state()
    if not state:
        return False
    pid = state.get("runner_pid")
    if pid:
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGTERM)
        _wait_gone(int(pid), 10.0)
    home = state.get("prefect_home")
    if home:
        _prefect(["server", "stop"], Path(home), timeout=60)
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()
    return True


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def status() -> dict:
    """``{"api_url", "api": bool, "runner": bool, "served": n, "current": bool}``."""
    state = read_state() or {}
    answer = ping(state) if state else None
    return {
        "api_url": state.get("api_url"),
        "api": bool(state) and api_healthy(state.get("api_url", "")),
        "runner": answer is not None,
        "served": (answer or {}).get("served", 0),
        "current": bool(state)
        and state.get("code") == code_fingerprint()
        and state.get("settings") == settings_fingerprint(),
    }


@contextlib.contextmanager
def running(port: int, *, ui: bool = False) -> Iterator[dict]:
    """``start`` … ``stop`` around a block (tests, benchmarks)."""
    state = start(port, ui=ui)
    try:
        yield state
    finally:
        stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m flows.runner serve SOCKET API_URL")
