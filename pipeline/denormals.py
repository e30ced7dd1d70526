"""Flush denormal floats to zero for one block of CPU work, then restore the mode found.

A head that fits its rows well has softmax probabilities below float32's smallest normal
number (about 1.2e-38, a logit margin of about 87): the cross-entropy gradient then holds
denormals, and on some CPUs each GEMM that reads them runs 10-20× slower. Measured here
(2-core Xeon, MKL, one thread): the weight-gradient GEMM (200, 256) × (256, 768) of a CARROT
step took 8.3 ms against 0.48 ms with flushing, which made the step 7-9× a plain step instead
of 2.5-4×. Values that small change no update, so training flushes them.

``torch.set_flush_denormal`` sets the calling thread's floating-point mode (x86 FTZ/DAZ) and
has no getter: the mode found is read by a probe (a denormal times 1 is 0 only when flushing),
and restored after the block, also when it raises. OpenMP worker threads keep their own mode;
the small steps this is for run on one thread (`pipeline.threads`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_DENORMAL = 1e-39  # below float32's smallest normal (1.18e-38), above its smallest denormal


def flushing_denormals() -> bool:
    """Whether float32 denormals are flushed to zero on this thread now."""
    return float(torch.tensor([_DENORMAL], dtype=torch.float32) * 1.0) == 0.0


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Run the block with denormals flushed (``enabled``; where the CPU supports it); yields
    whether they are flushed inside the block."""
    before = flushing_denormals()
    if not enabled or before:
        yield before
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)
