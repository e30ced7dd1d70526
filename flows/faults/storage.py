"""A full disk and a read-only place: one clear line, nothing corrupted, resumable afterwards.

- ``carrot embed`` onto a small ``tmpfs`` that fills midway: exit 2 and one stderr line naming
  the store and the fix; the store is not marked complete and does not verify; once the tmpfs
  is enlarged, the same command finishes with a store identical to an uninterrupted run's.
- ``carrot train --out DIR`` on a full ``tmpfs`` whose DIR holds a finished run: exit 2 and one
  line; every file of the finished run is unchanged; once space is freed the command finishes.
- ``carrot embed --root`` and ``carrot train --out`` in a read-only place: exit 2 and one line.

The disk-full trials mount a ``tmpfs`` and the read-only ones a read-only bind mount, which
need root (`mounts_available`); other users get the read-only trials on a folder without write
permission and the disk-full trials are reported as not run, with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flows.faults.console import carrot
from flows.faults.kills import EMBED_ARGS, ROW_ARRAYS, rows_of, store_of
from flows.faults.run_kills import half_written

SMALL_TMPFS = "600k"  # about half of the digits/test_resnet store (1.25 MB in 4 KiB pages)


@dataclass
class StorageReport:
    """Counts (targets: ``wrong_refusals`` 0, ``tracebacks`` 0, ``corrupted`` 0,
    ``failed_resumes`` 0)."""

    trials: int = 0
    refused_right: int = 0  # exit 2, one stderr line naming the place and the fix
    wrong_refusals: int = 0
    tracebacks: int = 0
    corrupted: int = 0  # marked complete early, a changed earlier run, a half-written file
    failed_resumes: int = 0  # the command once space returned did not finish as it should
    not_run: str = ""  # why the disk-full trials did not run (no mounts)
    details: list[dict] = field(default_factory=list)


def mounts_available() -> bool:
    """True when this process may mount a tmpfs (root with CAP_SYS_ADMIN, on Linux)."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with _tmpfs(Path(tmp), "64k"):
                return True
        except (OSError, subprocess.CalledProcessError):
            return False


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A ``tmpfs`` of ``size`` mounted on ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """``path`` made unwritable for the block: a read-only bind mount as root, else mode 0555."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _mount("--bind", str(path), str(path))
        try:
            _mount("-o", "remount,bind,ro", str(path))
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(mode)


def _judge(report: StorageReport, name: str, argv: list[str], needle: str, env: dict) -> dict:
    code, _, err = carrot(argv, **env)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    right = code == 2 and len(lines) == 1 and needle in lines[0]
    report.trials += 1
    report.refused_right += right
    report.wrong_refusals += not right
    report.tracebacks += "Traceback (most recent call last)" in err
    detail = {"trial": name, "exit": code, "stderr": lines[:3], "refused_right": right}
    report.details.append(detail)
    return detail


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _embed_on_full_disk(root: Path, report: StorageReport, env: dict) -> str:
    """The embed trial; returns the reference store's path (for the train trial)."""
    from stores import open_store

    args = ["embed", *EMBED_ARGS]
    code, _, err = carrot([*args, "--root", str(root / "reference")], **env)
    if code != 0:
        raise RuntimeError(f"the reference carrot embed failed ({code}): {err[-500:]}")
    reference = store_of(root / "reference")
    want = rows_of(reference)
    with _tmpfs(root / "small", SMALL_TMPFS) as small:
        detail = _judge(report, "embed, disk full", [*args, "--root", str(small)], "no space", env)
        store = store_of(small)
        if store is not None:
            complete = open_store(str(store), require_complete=False).complete
            verify, _, _ = carrot(["store", "verify", str(store)], **env)
            detail |= {"complete": complete, "verify_exit": verify}
            report.corrupted += complete or verify == 0
        _mount("-o", "remount,size=20m", str(small))
        code, _, err = carrot([*args, "--root", str(small)], **env)
        store = store_of(small)
        same = code == 0 and store is not None
        if same:
            got = rows_of(store)
            same = all(np.array_equal(got[k], want[k]) for k in ROW_ARRAYS)
        detail |= {"resume_exit": code, "resumed_identical": same}
        report.failed_resumes += not same
    return str(reference)


def _train_on_full_disk(root: Path, store: str, report: StorageReport, env: dict) -> None:
    with _tmpfs(root / "full", "20m") as full:
        out = full / "run"
        argv = ["train", store, "--out", str(out), "--aug", "none"]
        code, _, err = carrot(argv, **env)
        if code != 0:
            raise RuntimeError(f"carrot train on the tmpfs failed ({code}): {err[-500:]}")
        before = _digests(out)
        free = shutil.disk_usage(full).free
        filler = full / "filler"
        with filler.open("wb") as f:  # leave a few pages: the run's first files fit, not all
            f.truncate(0)
            f.write(b"\0" * max(0, free - 16 * 1024))
        detail = _judge(report, "train, disk full over a finished run", argv, "no space", env)
        after = _digests(out)
        problems = half_written(out)
        detail |= {"earlier_run_unchanged": after == before, "half_written": problems}
        report.corrupted += after != before or bool(problems)
        filler.unlink()
        code, _, _ = carrot(argv, **env)
        detail["rerun_exit"] = code
        report.failed_resumes += code != 0 or bool(half_written(out))


def run_storage_faults(root: Path) -> StorageReport:
    """Every trial above under ``root`` (``CARROT_HOME`` inside it)."""
    env = {"CARROT_HOME": str(root / "home")}
    report = StorageReport()
    if mounts_available():
        store = _embed_on_full_disk(root / "embed", report, env)
        _train_on_full_disk(root / "train", store, report, env)
    else:
        report.not_run = "disk-full trials need root to mount a tmpfs"
        code, _, err = carrot(["embed", *EMBED_ARGS, "--root", str(root / "plain")], **env)
        if code != 0:
            raise RuntimeError(f"carrot embed failed ({code}): {err[-500:]}")
        store = str(store_of(root / "plain"))
    with read_only_folder(root / "read-only") as ro:
        embed = ["embed", *EMBED_ARGS, "--root", str(ro / "stores")]
        _judge(report, "embed, read-only root", embed, "cannot write", env)
        train = ["train", store, "--out", str(ro / "run")]
        _judge(report, "train, read-only --out", train, "cannot write", env)
    return report
