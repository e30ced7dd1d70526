"""``carrot embed`` killed with SIGKILL at seeded moments, then run again.

Each trial starts ``carrot embed`` in a new process on a fresh root and kills it at a moment
drawn with the trial's seed: while it starts (a delay), or once a drawn number of store chunks
is flagged written. Then:

- an incomplete store must not verify (`carrot store verify` exits non-zero) and must not be
  marked complete — a store that is complete must hold every row;
- the same command, run again, must finish (exit 0) and leave a store whose rows (features,
  labels, ids, splits, validity, errors) equal those of an uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.faults.console import carrot, spawn

ROW_ARRAYS = ("features", "labels", "ids", "split", "valid", "errors")
EMBED_ARGS = (
    "sklearn:digits",
    "--backbone",
    "test_resnet",
    "--image-size",
    "32",
    "--chunk-rows",
    "64",  # 29 chunks
    "--batch-size",
    "64",
    "--workers",
    "0",
)


@dataclass
class KillReport:
    """Counts over the trials (targets: ``lost_rows`` 0, ``complete_early`` 0,
    ``verified_incomplete`` 0, ``not_identical`` 0, ``failed_reruns`` 0)."""

    trials: int = 0
    killed_mid_write: int = 0  # a store existed, incomplete, when the kill landed
    killed_before_store: int = 0
    finished_before_kill: int = 0
    verified_incomplete: int = 0  # an incomplete store that `carrot store verify` passed
    complete_early: int = 0  # marked complete while rows were missing
    failed_reruns: int = 0
    not_identical: int = 0
    lost_rows: int = 0
    details: list[dict] = field(default_factory=list)


def store_of(root: Path) -> Path | None:
    found = sorted(root.rglob("*.zarr"))
    return found[0] if found else None


def rows_of(url: Path) -> dict[str, np.ndarray]:
    import zarr

    group = zarr.open_group(str(url), mode="r")
    return {name: np.asarray(group[name][:]) for name in ROW_ARRAYS}


def _embed(root: Path, env: dict[str, str]) -> tuple[int, str]:
    proc = spawn(["embed", *EMBED_ARGS, "--root", str(root)], env, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err.decode(errors="replace")


def _kill_at(root: Path, env: dict[str, str], *, chunks: int | None, delay_s: float) -> str:
    """Start embed; SIGKILL it after ``delay_s`` (``chunks`` None) or once ``chunks`` chunks
    are flagged. Returns what happened: killed | finished."""
    proc = spawn(["embed", *EMBED_ARGS, "--root", str(root)], env)
    start = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - start < 300:
            if chunks is None:
                if time.monotonic() - start >= delay_s:
                    break
            else:
                store = store_of(root)
                flags = store / "progress" / "c" if store else None
                if flags is not None and flags.is_dir() and len(os.listdir(flags)) >= chunks:
                    break
            time.sleep(0.005)
        if proc.poll() is not None:
            return "finished"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def shared_api_url() -> str:
    """The configured Prefect API, or this process's temporary local server (started now,
    stopped when this process ends), for the runs this module starts."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    from flows.runtime import apply_defaults, start_guarded_server

    apply_defaults()
    url = get_current_settings().api.url
    if url:
        return url
    start_guarded_server()
    return SubprocessASGIServer().api_url


def run_kill_trials(root: Path, *, trials: int, seed: int = 0) -> KillReport:
    """``trials`` kill-and-rerun trials of ``carrot embed`` under ``root`` (see the module)."""
    from stores import open_store

    env = os.environ | {"CARROT_RUNNER": "0", "CARROT_HOME": str(root / "home")}
    env |= {"PREFECT_API_URL": shared_api_url()}  # one server for every run, not one each
    code, err = _embed(root / "reference", env)
    if code != 0:
        raise RuntimeError(f"the uninterrupted reference run failed ({code}): {err[-500:]}")
    reference = rows_of(store_of(root / "reference"))
    n_chunks = -(-len(reference["labels"]) // 64)
    rng = np.random.default_rng(seed)
    report = KillReport()
    for t in range(trials):
        trial = root / f"trial-{t:02d}"
        before = rng.random() < 0.2  # a fifth of the kills land while the command starts
        chunks = None if before else int(rng.integers(1, n_chunks))
        delay = float(rng.uniform(0.5, 6.0))
        what = _kill_at(trial, env, chunks=chunks, delay_s=delay)
        store = store_of(trial)
        detail = {"trial": t, "chunks": chunks, "delay_s": round(delay, 2), "outcome": what}
        report.trials += 1
        if what == "finished":
            report.finished_before_kill += 1
        elif store is None:
            report.killed_before_store += 1
        else:
            report.killed_mid_write += 1
            state = open_store(str(store), require_complete=False)
            if state.complete:
                rows = rows_of(store)
                if any(not np.array_equal(rows[k], reference[k]) for k in ROW_ARRAYS):
                    report.complete_early += 1
            else:
                code, _, _ = carrot(["store", "verify", str(store)])
                detail["verify_exit"] = code
                report.verified_incomplete += code == 0
        code, err = _embed(trial, env)
        detail["rerun_exit"] = code
        if code != 0:
            report.failed_reruns += 1
            detail["rerun_error"] = err.strip().splitlines()[-1:]
        else:
            rows = rows_of(store_of(trial))
            same = all(np.array_equal(rows[k], reference[k]) for k in ROW_ARRAYS)
            report.not_identical += not same
            valid = int(rows["valid"].astype(bool).sum())
            report.lost_rows += max(0, int(reference["valid"].astype(bool).sum()) - valid)
        report.details.append(detail)
    return report
