"""Do a sweep's Prefect artifacts render? A one-off check, not a test.

Starts ``carrot server`` (Prefect server with its UI) under a temporary ``CARROT_HOME`` on a free
loopback port, runs a tiny ``carrot sweep`` (two ``test_*`` backbones on ``sklearn:digits``),
finds its flow run through the REST API, and takes headless Chromium screenshots of the run's
Artifacts tab and of each artifact's page; then stops the server. Chromium comes from Debian
(``apt-get install chromium``).

    python -m benchmarks.artifacts_screenshot [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,1600",
    "--virtual-time-budget=15000",  # let the UI's scripts fetch and draw
)


def _carrot() -> str:
    return shutil.which("carrot") or str(Path(sys.executable).with_name("carrot"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def _shoot(chromium: str, url: str, path: Path, profile: Path) -> None:
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={path}", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"{path}  ({path.stat().st_size} bytes)  {url}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/artifacts"))
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home, port = Path(tmp) / "home", _free_port()
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"CARROT_HOME": str(home), "CARROT_RUNNER": "0"}
        carrot = _carrot()
        subprocess.run([carrot, "server", "start", "--port", str(port)], env=env, check=True)
        try:
            sweep = [carrot, "sweep", "sklearn:digits", "--backbones", "test_vit,test_resnet"]
            sweep += ["--image-size", "32", "--aug", "none,carrot", "--shots", "5", "--seeds", "2"]
            subprocess.run(sweep, env=env, check=True, timeout=900)
            api = f"http://127.0.0.1:{port}/api"
            runs = _post(api, "/flow_runs/filter", {"limit": 50})
            run = next(r for r in runs if _flow_name(api, r["flow_id"]) == "sweep")
            ui = f"http://127.0.0.1:{port}"
            profile = Path(tmp) / "chromium"
            tab = f"{ui}/runs/flow-run/{run['id']}?tab=Artifacts"
            _shoot(chromium, tab, args.out / "run-artifacts.png", profile)
            for artifact in _post(api, "/artifacts/filter", {"limit": 20}):
                if artifact.get("flow_run_id") == run["id"]:
                    _shoot(
                        chromium,
                        f"{ui}/artifacts/artifact/{artifact['id']}",
                        args.out / f"{artifact['key']}.png",
                        profile,
                    )
        finally:
            subprocess.run([carrot, "server", "stop"], env=env, check=False)
    return 0


def _flow_name(api: str, flow_id: str) -> str:
    with urllib.request.urlopen(f"{api}/flows/{flow_id}", timeout=10) as r:
        return json.loads(r.read())["name"]


if __name__ == "__main__":
    raise SystemExit(main())
