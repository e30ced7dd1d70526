"""One writer per store: refusal with a clear message, and recovery from dead or silent owners."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import zarr

from stores import StoreLockedError, open_store
from stores.location import resolve
from stores.lock import LOCK_NAME, StoreLock, read_owner
from stores.testing import open_synthetic_writer, synthetic_data, synthetic_identity, write_chunks

REPO = Path(__file__).resolve().parents[2]
DATA = synthetic_data(96, dim=4, seed=21)
IDENTITY = synthetic_identity(DATA)


def open_it(url: str, **kwargs):
    return open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=32, **kwargs)


def write_lock(url: str, **fields) -> None:
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "heartbeat": now}
    owner |= {"token": uuid.uuid4().hex} | fields
    Path(url).mkdir(parents=True, exist_ok=True)
    (Path(url) / LOCK_NAME).write_text(json.dumps(owner))


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_second_writer_is_refused_with_owner_and_fix(kind, tmp_path):
    url = (
        str(tmp_path / "s.zarr") if kind == "local" else f"memory://lock-{uuid.uuid4().hex}/s.zarr"
    )
    with open_it(url) as first:
        with pytest.raises(StoreLockedError) as refused:
            open_it(url)
        message = str(refused.value)
        for needle in (
            url,
            socket.gethostname(),
            f"pid {os.getpid()}",
            "since",
            "delete the lock file",
        ):
            assert needle in message
        write_chunks(first, DATA)  # the first writer is unaffected
        first.finalize(timings={})
    assert read_owner(resolve(url)) is None  # released
    assert open_store(url).complete


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    url = str(tmp_path / "s.zarr")
    script = textwrap.dedent(
        """
        import os, sys
        from stores.testing import open_synthetic_writer, synthetic_data, synthetic_identity
        data = synthetic_data(96, dim=4, seed=21)
        open_synthetic_writer(sys.argv[1], data, synthetic_identity(data), chunk_rows=32)
        os._exit(0)  # dies holding the lock
        """
    )
    child = subprocess.run([sys.executable, "-c", script, url], cwd=REPO, timeout=120)
    assert child.returncode == 0
    dead = read_owner(resolve(url))
    assert dead is not None and dead.pid != os.getpid()
    with pytest.raises(ProcessLookupError):
        os.kill(dead.pid, 0)
    with open_it(url) as writer:
        assert read_owner(resolve(url)).pid == os.getpid()
        write_chunks(writer, DATA)
        writer.finalize(timings={})


def test_other_host_lock_is_taken_over_only_after_ttl(tmp_path):
    url = str(tmp_path / "s.zarr")
    write_lock(url, host="worker-7.cluster", pid=1234, heartbeat=time.time() - 30)
    with pytest.raises(StoreLockedError, match=r"worker-7\.cluster, pid 1234"):
        open_it(url, lock_ttl_s=600)
    write_lock(url, host="worker-7.cluster", pid=1234, heartbeat=time.time() - 601)
    with open_it(url, lock_ttl_s=600):
        assert read_owner(resolve(url)).host == socket.gethostname()


def test_unreadable_lock_file_respected_then_recovered_when_old(tmp_path):
    url = str(tmp_path / "s.zarr")
    Path(url).mkdir()
    lock_file = Path(url) / LOCK_NAME
    lock_file.write_text("{not json")
    with pytest.raises(StoreLockedError, match="unreadable lock file"):
        open_it(url)
    os.utime(lock_file, (time.time() - 3600, time.time() - 3600))
    with open_it(url):
        assert read_owner(resolve(url)).pid == os.getpid()


def test_heartbeat_advances_and_a_stolen_lock_stops_the_writer(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_it(url) as writer:
        first = read_owner(resolve(url)).heartbeat
        time.sleep(0.01)
        write_chunks(writer, DATA, [0])
        assert read_owner(resolve(url)).heartbeat > first
        write_lock(url, host="elsewhere", pid=99)  # another writer took over
        with pytest.raises(StoreLockedError, match="elsewhere"):
            write_chunks(writer, DATA, [1])
    assert writer.pending_chunks() == [1, 2]  # chunk 1 was not written
    assert read_owner(resolve(url)).host == "elsewhere"  # not ours: left alone


def test_error_inside_with_releases_lock_and_leaves_store_incomplete(tmp_path):
    url = str(tmp_path / "s.zarr")
    with pytest.raises(RuntimeError), open_it(url) as writer:
        write_chunks(writer, DATA, [0, 1, 2])
        raise RuntimeError("boom")
    assert read_owner(resolve(url)) is None
    assert not open_store(url, require_complete=False).complete


def test_zarr_reads_ignore_the_lock_file_and_lock_false_writes_none(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_it(url) as writer:
        write_chunks(writer, DATA)
        assert (Path(url) / LOCK_NAME).exists()
        group = zarr.open_group(url, mode="r")
        assert group["features"].shape == (96, 4)
        assert open_store(url, require_complete=False).features().shape == (96, 4)
    other = str(tmp_path / "t.zarr")
    with open_it(other, lock=False) as writer:
        assert not (Path(other) / LOCK_NAME).exists()
        write_chunks(writer, DATA)
        writer.finalize(timings={})


def test_lock_object_is_reentrant_safe(tmp_path):
    location = resolve(str(tmp_path / "s.zarr"))
    lock = StoreLock(location).acquire()
    assert lock.held
    with pytest.raises(StoreLockedError):
        StoreLock(location).acquire()
    lock.release()
    lock.release()  # twice is fine
    assert not lock.held
    StoreLock(location).acquire().release()


def test_wait_s_waits_for_the_live_writer_then_finds_its_finished_store(tmp_path):
    import threading

    url = str(tmp_path / "s.zarr")
    first = open_it(url)

    def finish() -> None:
        time.sleep(1.0)
        write_chunks(first, DATA)
        first.finalize(timings={})
        first.close()

    with pytest.raises(StoreLockedError, match="--wait"):
        open_it(url)  # no wait: refused at once, the message names the option that waits
    worker = threading.Thread(target=finish)
    worker.start()
    try:
        second = open_it(url, wait_s=60)
    finally:
        worker.join()
    assert second.complete and second.pending_chunks() == []  # the finished store: no work
    assert read_owner(resolve(url)) is None


def test_wait_s_gives_up_after_its_time(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_it(url):
        start = time.monotonic()
        with pytest.raises(StoreLockedError):
            open_it(url, wait_s=3)
        assert 1.5 <= time.monotonic() - start < 30
