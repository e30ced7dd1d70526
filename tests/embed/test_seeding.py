"""Seeded blocks over the global RNGs (pipeline.embed.seeding): deterministic per seed even when
several threads run them at once, and the caller's RNG states restored."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import torch

from pipeline.embed.seeding import seeded_global_rngs


def draws(seed: int) -> tuple:
    """Draws from all three global RNGs with a GIL release in between (where another thread's
    seeding would land without the lock)."""
    with seeded_global_rngs(seed):
        a = torch.rand(8).tolist()
        time.sleep(0.001)
        return a, random.random(), float(np.random.rand())


def in_threads(fn, seeds, threads: int = 3) -> dict:
    out: dict = {}

    def work(part):
        for s in part:
            out[s] = fn(s)

    pool = [threading.Thread(target=work, args=(seeds[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def test_seeded_blocks_in_several_threads_equal_sequential_ones():
    seeds = list(range(30))
    alone = {s: draws(s) for s in seeds}
    assert in_threads(draws, seeds) == alone


def test_the_callers_rng_states_are_restored():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    draws(123)
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def _seeded_in_child(queue) -> None:
    queue.put(draws(7))


def test_a_child_forked_while_another_thread_holds_the_lock_can_seed():
    """DataLoader workers are forked: a lock held by another parent thread at that moment must
    not stay held in the child."""
    import multiprocessing

    from pipeline.embed import seeding

    held, release = threading.Event(), threading.Event()

    def hold():
        with seeding._GLOBAL_RNGS:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_seeded_in_child, args=(queue,))
        child.start()
        child.join(20)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join()
        assert not hung and child.exitcode == 0, "the child hung on the inherited lock"
        assert queue.get(timeout=5) == draws_after(release, holder)
    finally:
        release.set()
        holder.join()


def draws_after(release: threading.Event, holder: threading.Thread) -> tuple:
    release.set()
    holder.join()
    return draws(7)
