"""How fast everyday commands start: a cache-hit ``carrot embed`` in a new process.

Rows (each a median over ``repeats`` fresh processes, after one untimed warm-up of the page
cache), for a ``sklearn:digits`` / ``test_vit`` store that already exists:

* ``bare import`` — ``python -c "import flows.cli, pipeline, timm"``: the baseline;
* ``temporary server`` — the command with no server (Prefect's temporary one, per command);
* ``carrot server, own process`` — ``carrot server`` up, ``CARROT_RUNNER=0``;
* ``carrot server, warm runner`` — ``carrot server`` up, the command run by the runner.

Each command row reports wall time, the command's own reported work (the seconds on its
``images`` line), and (wall − work) / bare import. Target for the default path with the server
up: ≤ 1.5. Everything runs under a temporary ``CARROT_HOME`` on a free loopback port.

    python -m benchmarks.startup [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._report import write_report

DEFAULT_JSON = Path(__file__).parent / "results" / "startup.json"
TARGET = 1.5
_WORK = re.compile(r"images .*\(cache hit \(no backbone work\), ([0-9.]+) s\)")


def _carrot() -> str:
    return shutil.which("carrot") or str(Path(sys.executable).with_name("carrot"))


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return wall, done.stdout


def _row(name: str, samples: list[tuple[float, str]], bare: float | None) -> dict[str, Any]:
    walls = [w for w, _ in samples]
    works = []
    for _, out in samples:
        m = _WORK.search(out)
        works.append(float(m.group(1)) if m else 0.0)
    wall, work = statistics.median(walls), statistics.median(works)
    return {
        "path": name,
        "wall_s": wall,
        "work_s": work if bare is not None else None,
        "overhead_s": wall - work,
        "ratio_to_bare_import": (wall - work) / bare if bare else None,
        "target": TARGET if name == "carrot server, warm runner" else None,
        "repeats": len(samples),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Measure the four rows; returns ``{"rows": [...], "bare_import_s": s}``."""
    repeats = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="carrot-startup-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "CARROT_RUNNER")}
        env |= {"CARROT_HOME": str(Path(tmp) / "home"), "PREFECT_HOME": str(Path(tmp) / "ph")}
        embed = [_carrot(), "embed", "sklearn:digits", "--backbone", "test_vit"]
        bare_cmd = [sys.executable, "-c", "import flows.cli, pipeline, timm"]
        _timed(bare_cmd, env)  # page cache
        bare = statistics.median(_timed(bare_cmd, env)[0] for _ in range(repeats))
        rows = [_row("bare import", [(bare, "")], None)]
        _timed(embed, env)  # writes the store (a temporary server)
        rows.append(_row("temporary server", [_timed(embed, env) for _ in range(1)], bare))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = [_carrot(), "server"]
        try:
            _timed([*server, "start", "--port", str(port), "--no-ui"], env)
            own = dict(env, CARROT_RUNNER="0")
            rows.append(
                _row(
                    "carrot server, own process",
                    [_timed(embed, own) for _ in range(repeats)],
                    bare,
                )
            )
            _timed(embed, env)  # the runner's first child
            warm = [_timed(embed, env) for _ in range(repeats)]
            rows.append(_row("carrot server, warm runner", warm, bare))
        finally:
            subprocess.run([*server, "stop"], env=env, capture_output=True, timeout=120)
    return {"rows": rows, "bare_import_s": bare}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 repeats instead of 3")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    args = ap.parse_args(argv)
    result = run(quick=args.quick)
    write_report(
        "carrot embed cache hit, new process",
        result["rows"],
        json_path=args.json,
        extra={"bare_import_s": result["bare_import_s"]},
    )


if __name__ == "__main__":
    main()
