"""Running ``carrot`` for the fault scenarios: through its entry point in this process (what a
user sees on stdout and stderr, and the exit code), or as a new process (to kill it)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for the block, restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def carrot(args: Sequence[str], **env: str) -> tuple[int, str, str]:
    """``carrot ARGS`` through `flows.cli.main` in this process, with ``env`` set for the call:
    (exit code, stdout, stderr)."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with environment(**env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def spawn(
    args: Sequence[str], env: dict[str, str], *, stderr=subprocess.DEVNULL
) -> subprocess.Popen:
    """``carrot ARGS`` as a new process (``python -m flows.cli``), output discarded unless
    ``stderr=subprocess.PIPE``."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
