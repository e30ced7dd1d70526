"""Resumable, idempotent writes: crashes (simulated and a real kill -9), cache hits, chunk workers."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from stores import (
    StoreError,
    StoreIncompleteError,
    StoreInputError,
    StoreWriter,
    open_store,
    store_url,
    verify_store,
)
from stores.location import resolve
from stores.lock import LOCK_NAME, read_owner
from stores.schema import initial_attrs
from stores.testing import (
    open_synthetic_writer,
    synthetic_data,
    synthetic_identity,
    write_chunks,
    write_synthetic_store,
)

REPO = Path(__file__).resolve().parents[2]


def snapshot(url: str) -> dict[str, bytes]:
    """Every file of a local store by relative path (the root zarr.json without its timings)."""
    root = Path(url)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        files[str(path.relative_to(root))] = path.read_bytes()
    attrs = zarr.open_group(url, mode="r").attrs.asdict()
    attrs.pop("timings")
    files["zarr.json"] = repr(sorted(attrs.items())).encode()
    return files


def assert_same_store(url_a: str, url_b: str) -> None:
    a, b = snapshot(url_a), snapshot(url_b)
    assert sorted(a) == sorted(b)  # same files: no leftovers (lock, *.partial)
    for name in a:
        assert a[name] == b[name], f"{name} differs"
    ga, gb = zarr.open_group(url_a, mode="r"), zarr.open_group(url_b, mode="r")
    for name in ("features", "labels", "ids", "split", "valid", "errors", "progress"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted store of 37 chunks (the last one short)."""
    data = synthetic_data(590, dim=16, views=1, skip_every=13, seed=11)
    identity = synthetic_identity(data)
    url = store_url(str(tmp_path_factory.mktemp("ref")), identity)
    write_synthetic_store(url, data, identity, chunk_rows=16)
    return data, identity, url


def test_simulated_crash_then_resume_is_identical(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    writer = open_synthetic_writer(url, data, identity, chunk_rows=16)
    write_chunks(writer, data, [36, 0, 5, 6])
    # a chunk cut short mid-write: rows of chunk 1 half written, its flag never set
    zarr.open_group(url, mode="a")["features"][16:24] = 99.0
    del writer  # dropped without close or finalize: the lock file stays behind
    gc.collect()
    assert read_owner(resolve(url)).pid == os.getpid()

    resumed = open_synthetic_writer(url, data, identity, chunk_rows=999)  # stored chunking wins
    assert resumed.chunk_rows == 16 and not resumed.complete
    assert resumed.pending_chunks() == [c for c in range(37) if c not in {0, 5, 6, 36}]
    write_chunks(resumed, data, reversed(resumed.pending_chunks()))
    resumed.finalize(timings={"write_s": 1.0})
    resumed.close()
    assert_same_store(url, ref_url)
    assert verify_store(url).ok


def test_rewriting_a_chunk_is_idempotent(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    with open_synthetic_writer(url, data, identity, chunk_rows=16) as writer:
        write_chunks(writer, data)
        write_chunks(writer, data, [3, 3, 36])  # again: same bytes
        writer.finalize(timings={})
    assert_same_store(url, ref_url)


def test_complete_store_is_a_cache_hit_with_no_work(reference):
    data, identity, ref_url = reference
    before = {p: p.stat().st_mtime_ns for p in Path(ref_url).rglob("*")}
    writer = open_synthetic_writer(ref_url, data, identity, chunk_rows=16)
    assert writer.complete and writer.pending_chunks() == []
    with pytest.raises(StoreError, match="complete"):
        write_chunks(writer, data, [0])
    writer.finalize(timings={"other": 1})  # no-op
    writer.close()
    assert {p: p.stat().st_mtime_ns for p in Path(ref_url).rglob("*")} == before
    assert not (Path(ref_url) / LOCK_NAME).exists()
    assert open_store(ref_url).attrs["timings"] == {"write_s": 0.0}


def test_resume_refuses_other_inputs_or_identity(reference, tmp_path):
    data, identity, _ = reference
    url = store_url(str(tmp_path), identity)
    with open_synthetic_writer(url, data, identity, chunk_rows=16) as writer:
        write_chunks(writer, data, [0])
    changed = dataclasses.replace(data, labels=(data.labels + 1) % 3)  # other labels, same key
    with pytest.raises(StoreInputError, match="other labels under the same key"):
        open_synthetic_writer(url, changed, identity)
    with pytest.raises(StoreInputError, match="content key"):
        open_synthetic_writer(url, data, synthetic_identity(data, dtype="float32"))
    with pytest.raises(StoreInputError, match="dim=16"):
        data2 = synthetic_data(590, dim=8, views=1, skip_every=13, seed=11)
        open_synthetic_writer(url, data2, identity)
    # the refusals released the lock: a correct resume works
    with open_synthetic_writer(url, data, identity) as writer:
        assert writer.pending_chunks()[0] == 1


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from stores.testing import open_synthetic_writer, synthetic_data, synthetic_identity, write_chunks
    data = synthetic_data(590, dim=16, views=1, skip_every=13, seed=11)
    writer = open_synthetic_writer(sys.argv[1], data, synthetic_identity(data), chunk_rows=16)
    write_chunks(writer, data, delay_s=float(sys.argv[2]))
    writer.finalize(timings={})
    """
)


def run_and_kill(url: str, *, after_flags: int, delay_s: float) -> None:
    """Start a slow writer process and SIGKILL it once ``after_flags`` chunks are flagged."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url, str(delay_s)], cwd=REPO)
    flags = Path(url) / "progress" / "c"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if flags.is_dir() and len(os.listdir(flags)) >= after_flags:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the writer finished (or failed) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_mid_run_then_resume_is_identical(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    run_and_kill(url, after_flags=5, delay_s=0.03)
    owner = read_owner(resolve(url))
    assert owner is not None and owner.pid != os.getpid()  # the dead process's lock is left
    assert not open_store(url, require_complete=False).complete
    # a second process resumes (taking over the dead pid's lock) and is killed too
    run_and_kill(url, after_flags=12, delay_s=0.0)

    with open_synthetic_writer(url, data, identity) as writer:
        pending = writer.pending_chunks()
        assert 0 < len(pending) <= 37 - 12
        write_chunks(writer, data)
        writer.finalize(timings={})
    assert_same_store(url, ref_url)
    assert verify_store(url).ok


CHUNK_WORKER = textwrap.dedent(
    """
    import pickle, sys
    from stores import StoreWriter
    from stores.testing import synthetic_data, write_chunks
    data = synthetic_data(590, dim=16, views=1, skip_every=13, seed=11)
    if sys.argv[1] == "pickle":
        writer = pickle.loads(bytes.fromhex(sys.argv[2]))
    else:
        writer = StoreWriter.open_for_chunks(sys.argv[2])
    write_chunks(writer, data, [int(c) for c in sys.argv[3].split(",")])
    """
)


def test_worker_processes_write_disjoint_chunks_while_coordinator_holds_lock(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    with open_synthetic_writer(url, data, identity, chunk_rows=16) as coordinator:
        chunks = coordinator.pending_chunks()
        evens = ",".join(str(c) for c in chunks[::2])
        odds = ",".join(str(c) for c in chunks[1::2])
        blob = pickle.dumps(coordinator).hex()  # travels as a lock-free chunk writer
        procs = [
            subprocess.Popen([sys.executable, "-c", CHUNK_WORKER, "url", url, evens], cwd=REPO),
            subprocess.Popen([sys.executable, "-c", CHUNK_WORKER, "pickle", blob, odds], cwd=REPO),
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert coordinator.pending_chunks() == []
        coordinator.finalize(timings={})
    assert_same_store(url, ref_url)


def test_chunk_writer_cannot_finalize_and_needs_a_preallocated_store(reference, tmp_path):
    data, identity, _ = reference
    url = store_url(str(tmp_path), identity)
    with pytest.raises(StoreError, match="no store"):
        StoreWriter.open_for_chunks(url)
    with open_synthetic_writer(url, data, identity, chunk_rows=16):
        worker = StoreWriter.open_for_chunks(url)
        write_chunks(worker, data)
        with pytest.raises(StoreError, match="coordinator"):
            worker.finalize(timings={})
    assert not open_store(url, require_complete=False).complete


def test_creation_cut_short_is_rebuilt(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    group = zarr.open_group(url, mode="a")
    attrs = initial_attrs(
        identity, n=590, dim=16, chunk_rows=16, class_names=data.class_names, compressor=None
    )
    group.attrs.put(attrs)  # killed after the attributes and one half-made array
    group.create_array("labels", shape=(590,), chunks=(16,), dtype="int64")[:10] = 7
    with pytest.raises(StoreIncompleteError, match="never fully created"):
        open_store(url, require_complete=False)
    write_synthetic_store(url, data, identity, chunk_rows=16)
    assert_same_store(url, ref_url)


def test_unreadable_group_metadata_is_rebuilt(reference, tmp_path):
    data, identity, ref_url = reference
    url = store_url(str(tmp_path), identity)
    with open_synthetic_writer(url, data, identity, chunk_rows=16) as writer:
        write_chunks(writer, data, [0, 1])
    (Path(url) / "zarr.json").write_text('{"zarr_format": 3, "node_ty')  # torn write
    write_synthetic_store(url, data, identity, chunk_rows=16)
    assert_same_store(url, ref_url)


def test_copies_of_a_writer_are_the_writer(reference, tmp_path):
    data, identity, _ = reference
    with open_synthetic_writer(store_url(str(tmp_path), identity), data, identity) as writer:
        assert copy.copy(writer) is writer and copy.deepcopy({"w": writer})["w"] is writer
        clone = pickle.loads(pickle.dumps(writer))
        assert clone is not writer and clone.url == writer.url and clone._lock is None
