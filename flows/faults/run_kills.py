"""``carrot train``, ``carrot finetune`` and ``carrot sweep`` killed with SIGKILL at seeded moments.

- ``carrot train STORE --out DIR`` over a folder that already holds a finished run, killed at a
  drawn fraction of an uninterrupted run's time: afterwards every file in DIR must be whole (JSON
  parses, safetensors and PNGs load, the head loads with its config) — the old run or the new,
  never half of either — and the command run again must finish.
- ``carrot finetune … --out DIR`` killed likewise: no ``summary.json`` may claim completion, the
  checkpoint (if any) must load, and ``--resume`` (or a fresh start where no checkpoint was
  written yet) must finish with the uninterrupted run's final metrics.
- ``carrot sweep`` of two tiny backbones, killed likewise on a fresh store root and ``--out``:
  no table file or store may be half-written or claim rows it does not hold, and the command run
  again must finish with the uninterrupted sweep's rows (every deterministic field).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.faults.console import spawn
from flows.faults.kills import shared_api_url
from pipeline.evaluation.sweep import ROW_FIELDS

FINETUNE_ARGS = (
    "sklearn:digits",
    "--backbone",
    "test_vit",
    "--image-size",
    "32",
    "--epochs",
    "3",
    "--batch-size",
    "64",
    "--workers",
    "0",
)


SWEEP_ARGS = (
    "sklearn:digits",
    "--backbones",
    "test_resnet,test_vit",
    "--image-size",
    "32",
    "--batch-size",
    "64",
    "--device",
    "cpu",
)
_VARYING = ("images_per_s", "cache_hit", "seconds", "store", "reused")
SWEEP_FIELDS = (*(f for f in ROW_FIELDS if f not in _VARYING), "store_key")
"""The fields of a sweep row that a rerun must reproduce (not timings, paths, reuse)."""


@dataclass
class RunKillReport:
    """Counts (targets: ``half_written`` 0, ``complete_early`` 0, ``failed_reruns`` 0,
    ``not_identical`` 0)."""

    command: str
    trials: int = 0
    killed: int = 0  # the kill landed before the command ended
    half_written: int = 0  # an output that did not load whole
    complete_early: int = 0  # a summary claiming completion of a killed run
    failed_reruns: int = 0
    not_identical: int = 0  # a resumed fine-tune (or rerun sweep) whose results differ
    details: list[dict] = field(default_factory=list)


def _env(root: Path) -> dict[str, str]:
    return os.environ | {
        "CARROT_RUNNER": "0",
        "CARROT_HOME": str(root / "home"),
        "PREFECT_API_URL": shared_api_url(),
    }


def _run(args: list[str], env: dict[str, str], *, kill_after: float | None = None):
    """Run ``carrot ARGS``; with ``kill_after`` SIGKILL it then. (exit code, killed, seconds)."""
    start = time.monotonic()
    proc = spawn(args, env)
    try:
        proc.wait(timeout=kill_after)
        return proc.returncode, False, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.returncode, True, time.monotonic() - start


def _temporary(path: Path) -> bool:
    """A writer's temporary: ``pipeline.heads.io.atomic_file``'s hidden ``.NAME.tmp-PID-HEX.EXT``,
    a ``*.tmp`` or zarr's ``*.partial`` (moved onto the real name only once whole)."""
    name = path.name
    return path.suffix in (".tmp", ".partial") or (name.startswith(".") and ".tmp-" in name)


def half_written(folder: Path) -> list[str]:
    """Files under ``folder`` that do not load whole (JSON, safetensors, PNG, CSV, a checkpoint,
    a head with its config). Empty: every reader sees complete files. Temporaries a killed
    writer left (`_temporary`) are no one's output and are not read."""
    import csv

    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from pipeline.errors import InputError
    from pipeline.heads.io import CONFIG_FILE, WEIGHTS_FILE, load_head

    problems = []
    if not folder.exists():
        return problems
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _temporary(p)):
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".png":
                with Image.open(path) as img:
                    img.verify()
            elif path.suffix == ".csv":
                with path.open(newline="") as f:
                    list(csv.reader(f))
            elif path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure to read is what this looks for
            problems.append(f"{path.relative_to(folder)}: {type(e).__name__}")
    for head in {p.parent for p in folder.rglob(WEIGHTS_FILE)}:
        if (head / CONFIG_FILE).exists():
            try:
                load_head(head)
            except InputError as e:
                problems.append(f"{head.relative_to(folder)}: {e}")
    return problems


def run_train_kills(root: Path, store: str, *, trials: int, seed: int = 0) -> RunKillReport:
    """Kill ``carrot train STORE --out DIR`` over a finished run in DIR, ``trials`` times."""
    env, out = _env(root), root / "train-run"
    args = ["train", store, "--out", str(out)]
    code, _, took = _run(args, env)
    if code != 0:
        raise RuntimeError(f"the uninterrupted carrot train failed ({code})")
    rng = np.random.default_rng(seed)
    report = RunKillReport(command="carrot train")
    for t in range(trials):
        after = float(rng.uniform(0.2, 1.0)) * took
        _, killed, _ = _run(args, env, kill_after=after)
        problems = half_written(out)
        report.trials += 1
        report.killed += killed
        report.half_written += bool(problems)
        code, _, _ = _run(args, env)
        report.failed_reruns += code != 0 or bool(half_written(out))
        report.details.append(
            {"trial": t, "kill_after_s": round(after, 2), "killed": killed, "problems": problems}
        )
    return report


def _summary(out: Path) -> dict | None:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def run_finetune_kills(root: Path, *, trials: int, seed: int = 0) -> RunKillReport:
    """Kill ``carrot finetune`` ``trials`` times at seeded moments, then resume each run."""
    env = _env(root)
    reference = root / "finetune-reference"
    code, _, took = _run(["finetune", *FINETUNE_ARGS, "--out", str(reference)], env)
    want = _summary(reference)
    if code != 0 or want is None:
        raise RuntimeError(f"the uninterrupted carrot finetune failed ({code})")
    rng = np.random.default_rng(seed)
    report = RunKillReport(command="carrot finetune")
    for t in range(trials):
        out = root / f"finetune-{t:02d}"
        after = float(rng.uniform(0.3, 0.95)) * took
        _, killed, _ = _run(["finetune", *FINETUNE_ARGS, "--out", str(out)], env, kill_after=after)
        problems = half_written(out)
        early = killed and bool((_summary(out) or {}).get("complete"))
        report.trials += 1
        report.killed += killed
        report.half_written += bool(problems)
        report.complete_early += early
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        code, _, _ = _run(["finetune", *FINETUNE_ARGS, "--out", str(out), *resume], env)
        got = _summary(out)
        if code != 0 or got is None or not got.get("complete"):
            report.failed_reruns += 1
        else:
            keys = ("epochs", "steps", "best_epoch", "val_top1", "test_top1")
            report.not_identical += any(got.get(k) != want.get(k) for k in keys)
        report.details.append(
            {
                "trial": t,
                "kill_after_s": round(after, 2),
                "killed": killed,
                "resumed": bool(resume),
                "problems": problems,
            }
        )
    return report


def _sweep_rows(out: Path) -> list[dict] | None:
    """The rows of ``out/sweep.json``, or None where there is no whole one."""
    try:
        rows = json.loads((out / "sweep.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows if isinstance(rows, list) else None


def _same_rows(rows: list[dict], want: list[dict]) -> bool:
    """``rows`` and ``want`` agree, row for row, on `SWEEP_FIELDS`."""
    return len(rows) == len(want) and all(
        all(r.get(k) == w.get(k) for k in SWEEP_FIELDS) for r, w in zip(rows, want, strict=True)
    )


def _store_problems(stores: Path, reference: Path) -> tuple[list[str], dict[str, bool | None]]:
    """Stores under ``stores`` marked complete whose rows differ from the same store (by file
    name: backbone and content key) under ``reference``; and each store's ``complete`` (None:
    cut short while it was created, so it does not open at all)."""
    from flows.faults.kills import ROW_ARRAYS, rows_of
    from stores import StoreInputError, open_store

    problems, complete = [], {}
    for store in sorted(stores.rglob("*.zarr")):
        try:
            done = open_store(str(store), require_complete=False).complete
        except StoreInputError:
            complete[store.name] = None
            continue
        complete[store.name] = done
        if done:
            same = next(reference.rglob(store.name), None)
            rows, want = rows_of(store), rows_of(same) if same else None
            if want is None or any(not np.array_equal(rows[k], want[k]) for k in ROW_ARRAYS):
                problems.append(f"{store.name}: complete, rows differ from the reference")
    return problems, complete


def run_sweep_kills(root: Path, *, trials: int, seed: int = 0) -> RunKillReport:
    """Kill ``carrot sweep`` (`SWEEP_ARGS`) ``trials`` times at seeded moments, then rerun it.

    Each trial has its own store root and ``--out``, so every trial is independent and a kill
    can land in either backbone's stage 1 (a store being written), its probe, or the table
    files; the rerun must then resume the store and reuse the saved rows. (Sharing the
    reference's stores would make stage 1 a cache hit and only the probes would be killed.)
    Checked after the kill: every file of ``--out`` and of the stores loads whole
    (`half_written`); ``complete_early`` counts a ``sweep.json`` or saved row, or a store marked
    complete, that differs from the uninterrupted run's. The rerun must exit 0 with whole
    files and ``sweep.json`` rows equal to the reference's on `SWEEP_FIELDS`."""
    env = _env(root)

    def args(at: Path) -> list[str]:
        return ["sweep", *SWEEP_ARGS, "--root", str(at / "stores"), "--out", str(at / "out")]

    reference = root / "sweep-reference"
    code, _, took = _run(args(reference), env)
    want = _sweep_rows(reference / "out")
    if code != 0 or want is None or any(r.get("error") for r in want):
        raise RuntimeError(f"the uninterrupted carrot sweep failed ({code})")
    by_backbone = {r["backbone"]: r for r in want}
    rng = np.random.default_rng(seed)
    report = RunKillReport(command="carrot sweep")
    for t in range(trials):
        trial = root / f"sweep-{t:02d}"
        out = trial / "out"
        after = float(rng.uniform(0.2, 0.95)) * took
        _, killed, _ = _run(args(trial), env, kill_after=after)
        problems = half_written(out) + [f"stores/{p}" for p in half_written(trial / "stores")]
        early, complete = _store_problems(trial / "stores", reference / "stores")
        table = _sweep_rows(out)
        if killed and table is not None and not _same_rows(table, want):
            early.append("sweep.json: rows differ from the reference")
        saved = []
        for path in sorted((out / "rows").glob("*.json")):
            try:
                row = json.loads(path.read_text())
            except ValueError:  # counted by half_written
                continue
            saved.append(row.get("backbone"))
            if not _same_rows([row], [by_backbone.get(row.get("backbone"), {})]):
                early.append(f"rows/{path.name}: differs from the reference")
        report.trials += 1
        report.killed += killed
        report.half_written += bool(problems)
        report.complete_early += killed and bool(early)
        code, _, _ = _run(args(trial), env)
        got = _sweep_rows(out)
        if code != 0 or got is None or half_written(out):
            report.failed_reruns += 1
        else:
            report.not_identical += not _same_rows(got, want)
        report.details.append(
            {
                "trial": t,
                "kill_after_s": round(after, 2),
                "killed": killed,
                "rows_saved": saved,
                "stores_complete": complete,
                "table_written": table is not None,
                "rerun_exit": code,
                "rerun_reused": [r["backbone"] for r in got or [] if r.get("reused")],
                "problems": problems + early,
            }
        )
    return report
