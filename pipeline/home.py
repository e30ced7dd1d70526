"""Where carrot keeps its files: ``$CARROT_HOME`` (default ``~/.carrot``). Standard library only,
so the command line's start-up path can read it without importing the stages."""

from __future__ import annotations

import os
from pathlib import Path


def carrot_home() -> Path:
    """``$CARROT_HOME``, default ``~/.carrot``: stores, runs and benchmark reports live under it."""
    return Path(os.environ.get("CARROT_HOME") or Path.home() / ".carrot").expanduser()
