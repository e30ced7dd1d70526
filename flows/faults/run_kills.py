"""``carrot train`` and ``carrot finetune`` killed with SIGKILL at seeded moments.

- ``carrot train STORE --out DIR`` over a folder that already holds a finished run, killed at a
  drawn fraction of an uninterrupted run's time: afterwards every file in DIR must be whole (JSON
  parses, safetensors and PNGs load, the head loads with its config) — the old run or the new,
  never half of either — and the command run again must finish.
- ``carrot finetune … --out DIR`` killed likewise: no ``summary.json`` may claim completion, the
  checkpoint (if any) must load, and ``--resume`` (or a fresh start where no checkpoint was
  written yet) must finish with the uninterrupted run's final metrics.
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
    not_identical: int = 0  # a resumed fine-tune whose final metrics differ
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


def half_written(folder: Path) -> list[str]:
    """Files under ``folder`` that do not load whole (JSON, safetensors, PNG, CSV, a checkpoint,
    a head with its config). Empty: every reader sees complete files."""
    import csv

    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from pipeline.errors import InputError
    from pipeline.heads.io import CONFIG_FILE, WEIGHTS_FILE, load_head

    problems = []
    if not folder.exists():
        return problems
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
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
