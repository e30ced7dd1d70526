"""Run an iterator ahead in a background thread, so reading overlaps with the consumer's work."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_SECONDS = 0.05  # how often a producer waiting for room checks whether to stop
_JOIN_SECONDS = 5.0  # at most this long the consumer waits for a producer inside a slow item


def prefetch(items: Iterable[T], *, depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread produces up to ``depth`` ahead.

    ``depth <= 0`` iterates in the caller's thread. An error in the producer is re-raised to
    the consumer after the items before it. The producer thread ends whenever the returned
    generator ends or is closed: exhausted, a ``break`` out of the loop over it, an exception
    in that loop, ``close()``, or garbage collection (also when the collector happens to run
    in the producer thread). It finishes the item in hand first; a source that never returns
    one cannot be stopped.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:
            put((_DONE, exc))
            return
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="stores-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        # The collector may finalize this generator in any thread, the producer's included:
        # that thread returns by itself once it sees ``stop``, and cannot join itself.
        if thread is not threading.current_thread():
            thread.join(timeout=_JOIN_SECONDS)
