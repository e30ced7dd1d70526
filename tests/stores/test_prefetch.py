"""The background prefetcher: order, errors, and a producer thread that always ends."""

from __future__ import annotations

import gc
import itertools
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.heads.features import StreamingFeatures
from stores.prefetch import prefetch

ENDS_WITHIN = 2.0  # seconds a stopped producer may take to notice


class Source:
    """An endless (or ``n``-long) source that records the thread producing it and whether it
    was closed; ``fail_at`` raises there."""

    def __init__(self, n: int | None = None, *, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.thread: threading.Thread | None = None
        self.closed = threading.Event()
        self.produced = 0

    def __iter__(self):
        self.thread = threading.current_thread()
        try:
            for i in itertools.count() if self.n is None else range(self.n):
                if i == self.fail_at:
                    raise KeyError(f"block {i} is gone")
                self.produced += 1
                yield i
        finally:
            self.closed.set()

    def wait_for_thread(self) -> threading.Thread:
        deadline = time.monotonic() + ENDS_WITHIN
        while self.thread is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.thread is not None, "the producer never started"
        return self.thread


def _assert_ended(source: Source) -> None:
    thread = source.wait_for_thread()
    assert thread is not threading.current_thread()  # it did run in the background
    thread.join(ENDS_WITHIN)
    assert not thread.is_alive(), "the producer thread is still running"
    assert source.closed.wait(ENDS_WITHIN), "the source was never closed"


def test_yields_everything_in_order_from_a_background_thread():
    source = Source(50)
    assert list(prefetch(source, depth=3)) == list(range(50))
    _assert_ended(source)


def test_depth_zero_iterates_in_the_callers_thread():
    source = Source(5)
    assert list(prefetch(source, depth=0)) == list(range(5))
    assert source.thread is threading.current_thread()


def test_breaking_out_of_the_loop_ends_the_producer():
    source = Source()  # endless: the producer would fill the queue and wait for room
    for i in prefetch(source, depth=2):
        if i == 3:
            break
    _assert_ended(source)
    assert source.produced < 10  # it stayed about `depth` ahead, then stopped


def test_an_exception_in_the_consumer_ends_the_producer():
    source = Source()

    def consume() -> None:
        for i in prefetch(source, depth=2):
            if i == 2:
                raise RuntimeError("the consumer failed")

    with pytest.raises(RuntimeError, match="the consumer failed"):
        consume()
    _assert_ended(source)


def test_an_abandoned_generator_is_collected_and_ends_the_producer():
    source = Source()
    holder: dict[str, object] = {}
    it = prefetch(source, depth=2)
    assert next(it) == 0
    holder["self"], holder["it"] = holder, it  # a reference cycle: only the collector frees it
    del it, holder
    gc.collect()
    _assert_ended(source)


def test_collected_in_the_producer_thread_it_stops_without_an_error(monkeypatch):
    """The cyclic collector runs in whichever thread allocates; when that is the producer's,
    closing the generator there must not try to join the thread to itself."""
    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    dropped = threading.Event()
    collected_in: list[threading.Thread] = []

    class Tracked(Source):
        def __iter__(self):
            for i in super().__iter__():
                if dropped.is_set() and not collected_in:
                    gc.collect()
                    collected_in.append(threading.current_thread())
                yield i

    source = Tracked()
    holder: dict[str, object] = {}
    holder["self"], holder["it"] = holder, prefetch(source, depth=2)
    gc.disable()  # only the producer's explicit collection may free the cycle
    try:
        assert next(holder["it"]) == 0  # type: ignore[call-overload]
        del holder
        dropped.set()
        _assert_ended(source)
    finally:
        gc.enable()
    assert collected_in == [source.thread]
    assert unraisable == []


def test_a_producer_error_reaches_the_consumer_after_the_items_before_it():
    source = Source(10, fail_at=4)
    got = []
    with pytest.raises(KeyError, match="block 4 is gone"):
        for i in prefetch(source, depth=2):
            got.append(i)
    assert got == [0, 1, 2, 3]
    _assert_ended(source)


def test_a_consumer_slower_than_the_producer_does_not_block_it_forever():
    source = Source()
    it = prefetch(source, depth=1)
    assert next(it) == 0
    time.sleep(0.2)  # the producer is now waiting for room in a full queue
    it.close()
    _assert_ended(source)


def test_streaming_features_stop_their_reader_when_training_stops_early():
    """The head trainer's streamed split uses the same prefetcher: a loop that stops after a few
    batches leaves no reader thread behind."""
    readers: list[threading.Thread] = []
    X = np.arange(400 * 3, dtype=np.float32).reshape(400, 3)
    y = np.arange(400) % 4

    def read(i: int) -> tuple[np.ndarray, np.ndarray]:
        readers.append(threading.current_thread())
        return X[i * 10 : (i + 1) * 10], y[i * 10 : (i + 1) * 10]

    stream = StreamingFeatures(read, n_blocks=40, num_rows=400, dim=3, buffer_blocks=2)
    batches = stream.batches(
        5, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    )
    for n, _ in enumerate(batches, 1):
        if n == 3:
            break
    del batches
    assert readers and all(t is not threading.current_thread() for t in readers)
    for thread in set(readers):
        thread.join(ENDS_WITHIN)
        assert not thread.is_alive()
    assert len(readers) < 40  # it did not read the whole split
