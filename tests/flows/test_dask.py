"""Stage 1 and sweeps on a real Dask LocalCluster (2 worker processes) through prefect-dask's
``DaskTaskRunner``: a sharded store equals the single-process one (augmented views included), a
sweep runs one backbone per task, a worker killed mid-run loses nothing, and bad cluster options
are one-line errors."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import zarr
from distributed import Client
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cluster import Cluster, DaskOptions, dask_cluster
from pipeline.embed.backbone import BackboneConfig
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.parallel import dask_distribute, plan_units, split_pending
from pipeline.embed.run import EmbedSettings, run_embedding
from pipeline.errors import InputError
from stores import open_store, verify_store

ARRAYS = ("ids", "labels", "split", "valid", "errors", "features", "progress")


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster of 2 single-thread worker processes for this module's tests."""
    with dask_cluster(DaskOptions(workers=2)) as c:
        yield c


def _settings(root, *, image_size: int = 32, chunk_rows: int = 128, views: int = 0):
    return EmbedSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name="test_vit", image_size=image_size),
        extract=ExtractConfig(batch_size=32, num_workers=0, views=views),
        root=str(root),
        chunk_rows=chunk_rows,
    )


def _same_store(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ARRAYS:
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert ga.attrs["key"] == gb.attrs["key"] and gb.attrs["complete"] is True


def _embed_on(cluster: Cluster, settings: EmbedSettings) -> dict:
    from flows.embed import embed_flow
    from flows.runtime import flow_settings

    with flow_settings():
        flow = embed_flow.with_options(task_runner=cluster.task_runner())
        return flow(settings, workers=cluster.threads)


@given(
    pending=st.lists(st.integers(0, 60), unique=True).map(sorted),
    parts=st.integers(1, 9),
)
def test_split_pending_gives_contiguous_bounded_runs_covering_pending(pending, parts):
    runs = split_pending(pending, parts)
    assert [i for run in runs for i in run] == pending
    size = -(-len(pending) // parts) if pending else 0
    for run in runs:
        assert 1 <= len(run) <= size and run == list(range(run[0], run[-1] + 1))


def test_units_hold_only_their_rows():
    from pipeline.embed.sources import resolve_source

    source = resolve_source("sklearn:digits")
    units = plan_units("u", source, [0, 1, 2, 5, 6, 14], chunk_rows=128, workers=1)
    assert [u.chunks for u in units] == [(0, 1), (2,), (5, 6), (14,)]
    last = units[-1]
    assert last.first_row == 14 * 128 and last.rows == len(source) - 14 * 128
    assert last.source.records == source.records[14 * 128 :]


@pytest.mark.slow
def test_sharded_store_equals_single_process_store(tmp_path, cluster, prefect_harness):
    settings = _settings(tmp_path / "one", views=1)  # augmented views: seeded per full-set row
    single = run_embedding(settings)
    summary = _embed_on(cluster, replace(settings, root=str(tmp_path / "dask")))
    assert summary["key"] == single.key and not summary["cache_hit"]
    _same_store(single.store, summary["store"])
    assert verify_store(summary["store"]).ok
    again = _embed_on(cluster, replace(settings, root=str(tmp_path / "dask")))
    assert again["cache_hit"]
    with Client(cluster.address) as client:  # the same units without Prefect (notebooks)
        plain = run_embedding(
            replace(settings, root=str(tmp_path / "lib")),
            distribute=dask_distribute(client, cluster.threads),
        )
    _same_store(single.store, plain.store)


@pytest.mark.slow
def test_sweep_runs_one_backbone_per_task(tmp_path, cluster, prefect_harness, monkeypatch):
    from flows.runtime import flow_settings
    from flows.sweep import sweep_flow
    from pipeline.evaluation.sweep import SweepSpec

    monkeypatch.setenv("CARROT_HOME", str(tmp_path))
    spec = SweepSpec(
        data="sklearn:digits",
        backbones=("test_vit", "test_resnet", "no_such_backbone"),
        augs=("none",),
        shots=(2,),
        seeds=1,
        image_size=32,
        root=str(tmp_path / "stores"),
    )
    with flow_settings():
        flow = sweep_flow.with_options(task_runner=cluster.task_runner())
        result = flow(spec, str(tmp_path / "sweep"), distributed=True)
    rows = {r["backbone"]: r for r in result["rows"]}
    assert [r["backbone"] for r in result["rows"]] == list(spec.backbones)
    assert "no_such_backbone" in rows["no_such_backbone"]["error"]
    for name in ("test_vit", "test_resnet"):
        assert rows[name]["error"] is None and 0.5 < rows[name]["probe_top1"] <= 1
        assert 0.1 < rows[name]["shots2_top1"] < rows[name]["probe_top1"]
        assert rows[name]["shots2_top1_std"] == 0  # one draw
        assert open_store(rows[name]["store"]).complete


@pytest.mark.slow
def test_worker_killed_mid_run_then_rerun_loses_nothing(tmp_path, cluster, prefect_harness):
    settings = _settings(tmp_path / "one", image_size=64, chunk_rows=32)  # 57 chunks, 8 units
    reference = run_embedding(settings)
    target = replace(settings, root=str(tmp_path / "dask"))
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = _embed_on(cluster, target)
        except Exception as e:  # the run may fail; the rerun must then finish it
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    url = reference.store.replace(str(tmp_path / "one"), str(tmp_path / "dask"))
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline:
        try:
            done = int(np.asarray(zarr.open_group(url, mode="r")["progress"][:]).sum())
        except (FileNotFoundError, KeyError, ValueError):
            done = 0
        if done >= 3:
            break
        time.sleep(0.02)
    with Client(cluster.address) as client:
        pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    assert 3 <= done < 57, "the kill must land mid-run"
    thread.join(timeout=180)
    assert not thread.is_alive()
    if "error" in outcome:
        assert not open_store(url, require_complete=False).complete
        outcome["summary"] = _embed_on(cluster, target)  # the rerun resumes
    assert outcome["summary"]["store"] == url
    _same_store(reference.store, url)
    assert verify_store(url).ok


def test_local_cluster_puts_the_environment_back():
    before = dict(os.environ)
    with dask_cluster(DaskOptions(workers=1)) as c:
        assert c.threads == 1 and c.address.startswith("tcp://127.0.0.1:")
    assert dict(os.environ) == before


def test_local_cluster_leaves_the_dashboard_port_alone():
    """The local cluster's scheduler serves HTTP on a free local port: with 8787 taken (here, or
    by another cluster), Dask warns of nothing and 8787 stays its owner's."""
    import socket
    import warnings

    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 8787))
        taken.listen()
    except OSError:
        pass  # already held by someone else: taken all the same
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with dask_cluster(DaskOptions(workers=1)) as c:
                assert c.threads == 1
    finally:
        taken.close()
    assert not [w for w in caught if "already in use" in str(w.message)]


def test_bad_cluster_options_are_input_errors():
    from pipeline.cluster import _connect

    with pytest.raises(InputError, match="tcp://host:8786"):
        DaskOptions(address="localhost")
    with pytest.raises(InputError, match="no Dask scheduler answered"):
        _connect("tcp://127.0.0.1:9", timeout=1.0)  # nothing listens on the discard port


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--dask-address", "nonsense"], "'nonsense': give a scheduler address"),
        (["--dask-address", "tcp://a:1", "--dask-workers", "2"], "not allowed with argument"),
        (["--dask-workers", "0"], "expected a positive integer"),
    ],
)
def test_cli_cluster_options_one_line_exit_2(tmp_path, args, expected, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("CARROT_HOME", str(tmp_path))
    assert main(["embed", "sklearn:digits", "--backbone", "test_vit", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
