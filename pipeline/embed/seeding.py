"""Seeded blocks over the process-global RNGs, one thread at a time.

timm builds a random-init model with ``torch.nn.init`` (torch's global generator) and its train
transforms draw from Python's ``random`` and torch's global generator: neither takes a generator
of ours. So stage 1 seeds those global RNGs around each such call and restores them after — and
two of this process's threads doing that at once would interleave their draws (one thread's seed,
the other's draw), giving views and random-init weights that depend on timing. Every seeded
block holds one process-wide lock. Threads that draw from the global RNGs without it can still
disturb a block — and a Dask scheduler, Prefect's client and tornado's timers in the same process
do — so the training views no longer come from here: `pipeline.embed.views` feeds timm's
transform steps from private RNGs, and only a transform with a step it does not know (and
random-init model construction, which draws from torch alone) still runs in a seeded block.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_GLOBAL_RNGS = threading.RLock()  # held by every seeded block of this process


def _new_lock_in_child() -> None:
    """A forked child (a DataLoader worker) starts with a free lock: one held by another thread
    of the parent at the fork would otherwise stay held forever in the child."""
    global _GLOBAL_RNGS
    _GLOBAL_RNGS = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator, Python's ``random`` and NumPy's global RNG seeded
    by ``seed`` (≥ 0), under the process-wide lock; their states are restored after."""
    with _GLOBAL_RNGS:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
