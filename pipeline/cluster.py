"""Dask for ``carrot embed`` and ``carrot sweep``: an existing cluster or a LocalCluster, used
through prefect-dask's ``DaskTaskRunner`` (only ``.submit()``-ed tasks go to Dask).

``--dask-address tcp://host:8786`` connects to a running ``distributed`` scheduler (its workers
need the store root and the data on shared storage, and must reach the Prefect API:
``carrot server start`` or ``PREFECT_API_URL``); ``--dask-workers N`` starts a LocalCluster of N
worker processes with one thread each for the command's lifetime, with `WORKER_CONFIG`; the
environment variables the nanny sets in this process for its children (``OMP_NUM_THREADS=1``
and the like) are put back when the cluster closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError

_ADDRESS = re.compile(r"(tcp|tls|ucx|ws|wss)://[^\s/:]+:(?P<port>[0-9]{1,5})", re.ASCII)
WORKER_CONFIG = {
    "distributed.worker.daemon": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
"""Dask settings of carrot's LocalCluster: non-daemonic workers (their extraction may start
DataLoader decode workers) without distributed's ``MALLOC_TRIM_THRESHOLD_=65536``, which made
stage 1 2.4× slower here (a 64-image chunk of resnet18 at 224 px: 6.0 s instead of 2.5 s)."""
CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for an existing scheduler to answer before the command gives up."""


def check_address(address: str) -> str:
    """``address`` when it is a scheduler address (``tcp://host:port``, or tls/ucx/ws/wss);
    else an `InputError` naming it and the form."""
    m = _ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise InputError(
            f"--dask-address {address!r}: give a scheduler address such as tcp://host:8786 "
            "(start one with `dask scheduler`)"
        )
    return address


@dataclass(frozen=True)
class DaskOptions:
    """Where the work goes: ``address`` of a scheduler, or ``workers`` local processes; neither:
    in this process (the default)."""

    address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.address is not None and self.workers is not None:
            raise InputError("give --dask-address or --dask-workers, not both")
        if self.address is not None:
            check_address(self.address)
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--dask-workers {self.workers}: give a positive integer")

    @property
    def enabled(self) -> bool:
        return self.address is not None or self.workers is not None


@dataclass(frozen=True)
class Cluster:
    """A reachable scheduler and the worker threads it had when the command started."""

    address: str
    threads: int

    def task_runner(self) -> Any:
        """A ``DaskTaskRunner`` on this cluster (reused, not started per flow run)."""
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=self.address)


@contextlib.contextmanager
def dask_cluster(options: DaskOptions) -> Iterator[Cluster | None]:
    """The cluster of ``options`` for the block (None when not enabled); a LocalCluster is
    closed, and this process's environment restored, when the block ends.

    Raises:
        InputError: the scheduler does not answer within `CONNECT_TIMEOUT_S`, or has no workers.
    """
    if not options.enabled:
        yield None
    elif options.address is not None:
        yield _connect(options.address)
    else:
        with _local_cluster(options.workers or 1) as cluster:
            yield cluster


def _connect(address: str, timeout: float = CONNECT_TIMEOUT_S) -> Cluster:
    from distributed import Client

    try:
        with Client(address, timeout=timeout) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"]
    except OSError as e:  # includes TimeoutError and distributed's CommClosedError
        raise InputError(
            f"--dask-address {address!r}: no Dask scheduler answered ({type(e).__name__}); start "
            "one with `dask scheduler` and workers with `dask worker ADDRESS`"
        ) from None
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    if not threads:
        raise InputError(
            f"--dask-address {address!r}: the scheduler has no workers; start some with "
            f"`dask worker {address}`"
        )
    return Cluster(address, threads)


@contextlib.contextmanager
def _local_cluster(workers: int) -> Iterator[Cluster]:
    import dask
    from distributed import LocalCluster

    before = dict(os.environ)
    try:
        with (
            dask.config.set(WORKER_CONFIG),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,  # no dashboard; its HTTP server (health, metrics)
                # on a free local port, not 8787 (a user's own cluster's, or a second carrot's)
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                silence_logs=logging.ERROR,
            ) as cluster,
        ):
            yield Cluster(cluster.scheduler_address, workers)
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)
