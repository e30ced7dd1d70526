"""Prefect runtime defaults for a command-line tool: offline-safe, quiet, no heartbeat wait.

Import this module before ``prefect`` (``flows/__init__`` does), so the environment defaults take
effect. A user's own settings (``PREFECT_API_URL``, log levels) win over these defaults.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # the temporary server logs cancelled-event tracebacks when the process exits
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_defaults() -> None:
    """Set quiet, offline-safe Prefect environment defaults (never overriding the user's)."""
    for name, value in _DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def flow_settings() -> Iterator[None]:
    """Run flows without the heartbeat thread (its join costs ~1 s per sync flow run)."""
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


def tracking_server() -> str:
    """Where flow runs are recorded: the configured API or a temporary local server."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url or "temporary local server (set PREFECT_API_URL to keep runs)"
