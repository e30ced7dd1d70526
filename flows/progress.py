"""A process-local progress hook: the CLI installs a bar, flow tasks report finished images.

A module global rather than a context variable: Prefect may run a task in another thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_hooks: dict[str, Callable[[int], None]] = {}


@contextlib.contextmanager
def reporting(*, start: Callable[[int], None], advance: Callable[[int], None]) -> Iterator[None]:
    """Install ``start(total)`` and ``advance(n)`` callbacks for the duration of the block."""
    _hooks.update(start=start, advance=advance)
    try:
        yield
    finally:
        _hooks.clear()


def start(total: int) -> None:
    """Announce the number of images about to be processed."""
    if "start" in _hooks:
        _hooks["start"](total)


def advance(n: int) -> None:
    """Report ``n`` more images finished."""
    if "advance" in _hooks:
        _hooks["advance"](n)
