"""Torch's intra-op thread count, changed for a block of work and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave as is); restore the count after.

    Tiny matmuls (probe heads, CARROT geometry) gain nothing from threads, and when another
    process holds a core their OpenMP barriers slow them 10× or more (measured on 2 cores)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
