"""Torch's intra-op thread count: a policy by problem size, and a block that sets and restores it.

Library code never changes torch's global thread count for good (nor at import): every change
is made for one block of work and undone after it, also when the block raises.

**The policy** (`threads_for`). Stage-2 training is a loop of many small steps, each a few
matmuls of ``rows × dim`` features against ``dim × heads·classes`` weights plus elementwise work;
every torch op splits over OpenMP threads and ends at a barrier. Alone on the machine, two
threads do a step in ~0.55–0.85 of one thread's time. But when another process holds a core,
a thread that waits at a barrier for a descheduled partner spins through its time slice, and
the steps slow down instead: the 13-head plain bank on digits pixels took 0.6 s on one thread
either way, 0.45 s on two threads idle and 2.0 s on two threads beside one busy-loop process
(the project issue saw 1.8 s → 270 s). So:

* ``work < THREADS_FROM_WORK`` — one thread;
* larger — every available thread (`available_threads`: torch's current count, capped by the
  CPUs this process may run on — a caller that lowered the count keeps it lowered);
* a thread count the user asked for (``requested``) always wins.

``work`` is the multiply-adds of one step's matmul, ``rows × dim × heads × classes`` (see
`step_work`): the full train split for L-BFGS heads, a minibatch for Adam heads.

**How the threshold was measured** (2 cores, torch 2.14 on MKL/OpenMP, float64 L-BFGS fits of
13 plain heads, iterations capped, medians of 3 interleaved repeats; "idle" samples kept only
while other processes used < 0.15 of a core; "busy": beside ``python -c "while True: pass"``)::

    work (rows·dim·heads·classes)   9.4e6  7.5e7  6.0e8  2.0e9  5.4e9
    2 threads / 1 thread, idle       0.84   0.68   0.60   0.54   0.59
    2 threads / 1 thread, busy       3.18   2.04   1.74   1.37   1.20

Two threads pay off only if the machine is contended less than ``(1 − idle) / (busy − idle)``
of the time: 7 %, 24 %, 35 %, 55 %, 67 % at those sizes. The threshold is where that crosses
one half (about 1.5e9, between 6e8 and 2e9), rounded down: ``1e9``. Minibatch steps (autograd, Adam: more ops,
so more barriers, per multiply-add) lose at least as much when busy (2.2× at 1.2e8).

**Not done here, on purpose:**

* inter-op threads (``torch.set_num_interop_threads``) can be set once per process, before any
  inter-op work, and eager training does not use them: left alone;
* OpenMP's spin-wait is what turns a busy core into a 2–10× slowdown. ``OMP_WAIT_POLICY=PASSIVE``
  (GNU OpenMP; ``KMP_BLOCKTIME=0`` for Intel's) makes waiting threads sleep instead — measured
  here per L-BFGS evaluation (8e5–1.2e10): two threads beside a busy loop then took 0.85–1.4×
  one thread's time instead of up to 11×, but gained little idle. The runtime reads it once, when torch loads, so library code cannot set it;
  export it before starting Python on a shared machine when you ask for several threads;
* the machine's load is not sampled: a snapshot (``/proc/loadavg``) counts our own spinning
  OpenMP workers, is host-wide inside containers, and is stale a second later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from pipeline.errors import InputError

THREADS_FROM_WORK = 1e9
"""Steps of at least this many multiply-adds (rows × dim × heads × classes) use every available
thread; smaller ones run on one (measured: see the module docstring)."""


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


def step_work(rows: int, dim: int, heads: int, classes: int) -> float:
    """Multiply-adds of one ``(rows, dim) @ (dim, heads·classes)`` matmul: a training step's size."""
    return float(rows) * float(dim) * float(heads) * float(classes)


def available_threads() -> int:
    """Torch's current intra-op thread count, capped by the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


def check_threads(requested: object, *, option: str = "threads") -> int | None:
    """``requested`` if it is None or an integer ≥ 1; else `InputError` naming ``option``."""
    if requested is None:
        return None
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InputError(
            f"{option} {requested!r}: give a positive integer, or leave it unset (auto: one "
            f"thread below {THREADS_FROM_WORK:.0e} multiply-adds per step, all above)"
        )
    return requested


def threads_for(work_flops: float, requested: int | None = None) -> int:
    """Torch threads for training steps of ``work_flops`` multiply-adds each (`step_work`):
    ``requested`` when given; else 1 below `THREADS_FROM_WORK` (or for an unknown size: NaN),
    `available_threads` from it on."""
    if check_threads(requested) is not None:
        return requested  # type: ignore[return-value]
    if not work_flops >= THREADS_FROM_WORK:  # NaN: unknown size, the safe choice
        return 1
    return available_threads()


@contextlib.contextmanager
def thread_policy(
    work_flops: float, requested: int | None = None, *, device: str | torch.device = "cpu"
) -> Iterator[int]:
    """Run the block with `threads_for` ``(work_flops, requested)`` torch threads; restore the
    count after (also when the block raises). Yields the count in use.

    On a GPU the steps do not run on CPU threads: the count is left as it is unless
    ``requested``."""
    if torch.device(device).type != "cpu" and check_threads(requested) is None:
        n = None
    else:
        n = threads_for(work_flops, requested)
    with torch_threads(n):
        yield torch.get_num_threads()
