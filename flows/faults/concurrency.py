"""Writers that meet: two ``carrot embed`` runs on one store, a lock left by a killed process, a
lock held on another host, and two stores written at once.

- A second ``carrot embed`` of a store another live process is writing exits 2 with one line
  naming that process and the fix; with ``--wait`` it waits and then finds the finished store
  (a cache hit, exit 0). The first run's store is identical to an uninterrupted run's.
- ``carrot embed`` killed with SIGKILL leaves its lock file; the next run takes it over (the
  process is gone), finishes, and the store is identical to the uninterrupted one.
- A lock of another host with a fresh heartbeat is respected (exit 2, one line naming the host);
  once its heartbeat is older than the lock's ttl it is taken over and the run finishes.
- Two ``carrot embed`` processes writing two different stores under one root at once both
  finish with stores identical to the ones each writes alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.faults.console import carrot, spawn
from flows.faults.kills import EMBED_ARGS, ROW_ARRAYS, rows_of, shared_api_url, store_of

SLOW_ARGS = (*EMBED_ARGS[:3], "--image-size", "64", *EMBED_ARGS[5:])  # a few seconds to write
OTHER_ARGS = (*EMBED_ARGS[:3], "--image-size", "40", *EMBED_ARGS[5:])  # another store


@dataclass
class ConcurrencyReport:
    """Counts (targets: every ``…wrong`` 0, ``tracebacks`` 0, ``not_identical`` 0)."""

    scenarios: int = 0
    refusals_wrong: int = 0  # a writer that should be refused was not, or not on one line
    waits_wrong: int = 0  # ``--wait`` did not end in the finished store
    recoveries_wrong: int = 0  # a stale lock that was not taken over
    tracebacks: int = 0
    not_identical: int = 0  # a final store that differs from a lone, uninterrupted run's
    details: list[dict] = field(default_factory=list)


def _lock_of(root: Path) -> Path | None:
    store = store_of(root)
    lock = store / ".carrot-lock" if store else None
    return lock if lock is not None and lock.exists() else None


def _wait_for(condition, timeout_s: float = 120.0) -> bool:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _one_line(code: int, err: str, needle: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code == 2 and len(lines) == 1 and needle in lines[0]


def _same(root: Path, want: dict[str, np.ndarray]) -> bool:
    store = store_of(root)
    if store is None:
        return False
    got = rows_of(store)
    return all(np.array_equal(got[k], want[k]) for k in ROW_ARRAYS)


class Scenarios:
    """The scenarios, each a method adding to ``report``; ``reference`` runs a lone embed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {"CARROT_HOME": str(root / "home")}
        self.penv = os.environ | {"CARROT_RUNNER": "0", "PREFECT_API_URL": shared_api_url()}
        self.penv |= self.env
        self.report = ConcurrencyReport()

    def embed(self, args, root: Path, *extra: str) -> tuple[int, str, str]:
        code, out, err = carrot(["embed", *args, "--root", str(root), *extra], **self.env)
        self.report.tracebacks += "Traceback (most recent call last)" in err
        return code, out, err

    def reference(self, args, name: str) -> dict[str, np.ndarray]:
        code, _, err = self.embed(args, self.root / name)
        if code != 0:
            raise RuntimeError(f"the reference carrot embed failed ({code}): {err[-500:]}")
        return rows_of(store_of(self.root / name))

    def two_writers(self, want: dict[str, np.ndarray]) -> None:
        """A live writer; a second run is refused, a third one ``--wait``s for it."""
        root = self.root / "two-writers"
        first = spawn(["embed", *SLOW_ARGS, "--root", str(root)], self.penv)
        try:
            locked = _wait_for(lambda: _lock_of(root) is not None or first.poll() is not None)
            live = locked and first.poll() is None
            code, _, err = self.embed(SLOW_ARGS, root)
            refused = live and _one_line(code, err, f"pid {first.pid}")
            code_wait, out, _ = self.embed(SLOW_ARGS, root, "--wait")
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        waited = code_wait == 0 and first.returncode == 0 and "cache hit" in out.lower()
        same = _same(root, want)
        self.report.scenarios += 2
        self.report.refusals_wrong += not refused
        self.report.waits_wrong += not waited
        self.report.not_identical += not same
        self.report.details.append(
            {
                "scenario": "a second writer, then one with --wait",
                "first_was_live": live,
                "second": {"exit": code, "stderr": err.strip().splitlines()[:2]},
                "waited_exit": code_wait,
                "identical": same,
            }
        )

    def killed_writer(self, want: dict[str, np.ndarray]) -> None:
        """SIGKILL a writer after its first chunks: its lock stays; the next run takes it over."""
        root = self.root / "killed-writer"
        proc = spawn(["embed", *SLOW_ARGS, "--root", str(root)], self.penv)
        flags = lambda: (store_of(root) or root / "none") / "progress" / "c"  # noqa: E731
        _wait_for(lambda: proc.poll() is not None or (flags().is_dir() and any(flags().iterdir())))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _lock_of(root) is not None
        code, _, err = self.embed(SLOW_ARGS, root)
        recovered = left and code == 0 and _lock_of(root) is None
        same = _same(root, want)
        self.report.scenarios += 1
        self.report.recoveries_wrong += not recovered
        self.report.not_identical += not same
        self.report.details.append(
            {
                "scenario": "the lock of a killed writer",
                "lock_left": left,
                "exit": code,
                "stderr": err.strip().splitlines()[-1:] if code else [],
                "identical": same,
            }
        )

    def other_host(
        self, want: dict[str, np.ndarray], store_name: str, args: tuple[str, ...] = SLOW_ARGS
    ) -> None:
        """A lock written by another host: respected while its heartbeat is fresh, taken over
        once it is older than the ttl."""
        from stores.lock import DEFAULT_TTL_S, LOCK_NAME

        root = self.root / "other-host"
        folder = root / "digits" / store_name
        folder.mkdir(parents=True)
        now = time.time()
        owner = {"host": "far-away-host", "pid": 4242, "since": now, "heartbeat": now}
        owner["token"] = uuid.uuid4().hex
        (folder / LOCK_NAME).write_text(json.dumps(owner))
        code, _, err = self.embed(args, root)
        refused = _one_line(code, err, "far-away-host")
        owner["heartbeat"] = now - DEFAULT_TTL_S - 60
        (folder / LOCK_NAME).write_text(json.dumps(owner))
        code_after, _, _ = self.embed(args, root)
        same = code_after == 0 and _same(root, want)
        self.report.scenarios += 2
        self.report.refusals_wrong += not refused
        self.report.recoveries_wrong += code_after != 0
        self.report.not_identical += code_after == 0 and not same
        self.report.details.append(
            {
                "scenario": "a lock of another host, fresh then expired",
                "fresh": {"exit": code, "stderr": err.strip().splitlines()[:2]},
                "expired_exit": code_after,
                "identical": same,
            }
        )

    def two_stores(self, want: dict[str, np.ndarray], want_other: dict[str, np.ndarray]) -> None:
        """Two processes, two stores, one root, at once."""
        root = self.root / "two-stores"
        procs = [
            spawn(["embed", *args, "--root", str(root)], self.penv, stderr=subprocess.PIPE)
            for args in (SLOW_ARGS, OTHER_ARGS)
        ]
        codes = [p.wait(timeout=300) for p in procs]
        for p in procs:
            p.stderr.close()
        stores = sorted(root.rglob("*.zarr"))
        got = [rows_of(s) for s in stores]
        wants = (want, want_other)
        same = len(got) == 2 and all(
            any(all(np.array_equal(g[k], w[k]) for k in ROW_ARRAYS) for g in got) for w in wants
        )
        self.report.scenarios += 1
        self.report.not_identical += codes != [0, 0] or not same
        self.report.details.append(
            {"scenario": "two stores at once", "exits": codes, "identical": same}
        )


def run_concurrency(root: Path) -> ConcurrencyReport:
    """Every scenario above under ``root``."""
    s = Scenarios(root)
    want = s.reference(SLOW_ARGS, "reference")
    want_other = s.reference(OTHER_ARGS, "reference-other")
    s.two_writers(want)
    s.killed_writer(want)
    s.other_host(want, store_of(root / "reference").name)
    s.two_stores(want, want_other)
    return s.report
