"""Write → read roundtrips on local paths, file:// and memory:// URLs; readers and listing."""

from __future__ import annotations

import threading
import uuid

import dask.array as da
import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from stores import (
    StoreIncompleteError,
    StoreInputError,
    StoreNotFoundError,
    list_stores,
    open_store,
    store_url,
    verify_store,
)
from stores.location import resolve
from stores.rowread import RowReader, gather_rows
from stores.testing import (
    open_synthetic_writer,
    synthetic_data,
    synthetic_identity,
    write_chunks,
    write_synthetic_store,
)


def root_for(kind: str, tmp_path) -> str:
    if kind == "local":
        return str(tmp_path / "stores")
    if kind == "file":
        return f"file://{tmp_path}/stores"
    return f"memory://carrot-tests-{uuid.uuid4().hex}"


def expected_features(data, dtype: str, view: int | None = 0) -> np.ndarray:
    x = data.features.astype(dtype).astype(np.float32)
    x[~data.valid] = 0
    return x if view is None or x.ndim == 2 else x[:, view]


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_roundtrip_every_array_and_attr(kind, dtype, tmp_path):
    data = synthetic_data(700, dim=12, skip_every=50, seed=1)
    identity = synthetic_identity(data, dtype=dtype)
    url = store_url(root_for(kind, tmp_path), identity)
    write_synthetic_store(url, data, identity, chunk_rows=128)

    store = open_store(url)
    assert (store.n, store.dim, store.views, store.dtype) == (700, 12, 0, dtype)
    assert store.identity == identity and store.key == identity.key() and store.complete
    assert store.class_names == data.class_names
    assert store.attrs["schema_version"] == 1 and store.attrs["timings"] == {"write_s": 0.0}
    assert store.attrs["skipped"] == [
        {"id": data.ids[i], "reason": "cannot identify image file"} for i in range(0, 700, 50)
    ]
    valid = data.valid
    np.testing.assert_array_equal(store.valid_mask(), valid)
    np.testing.assert_array_equal(store.features(), expected_features(data, dtype)[valid])
    np.testing.assert_array_equal(store.features(valid_only=False), expected_features(data, dtype))
    np.testing.assert_array_equal(store.labels(), data.labels[valid])
    assert store.ids() == [i for i, v in zip(data.ids, valid, strict=True) if v]
    assert store.split_array().tolist() == data.split
    assert store.features().dtype == np.float32 and store.labels().dtype == np.int64
    assert store.nbytes() == 700 * 12 * np.dtype(dtype).itemsize
    if kind != "memory":
        assert store._features.direct  # local uncompressed: the direct-file path was used
    assert verify_store(url).ok


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_views_layout_and_readers(kind, tmp_path):
    data = synthetic_data(300, dim=8, views=3, seed=2)
    identity = synthetic_identity(data)
    url = store_url(root_for(kind, tmp_path), identity)
    write_synthetic_store(url, data, identity, chunk_rows=64)
    raw = zarr.open_group(resolve(url).zarr_store(read_only=True), mode="r")["features"]
    assert raw.shape == (300, 4, 8) and raw.chunks == (64, 4, 8)

    store = open_store(url)
    full = expected_features(data, "float16", view=None)
    assert store.views == 3
    for view in range(4):
        np.testing.assert_array_equal(
            store.features("val", view=view), full[np.array(data.split) == "val", view]
        )
    np.testing.assert_array_equal(
        store.views_array("train"), full[np.array(data.split) == "train", 1:]
    )
    with pytest.raises(StoreInputError, match="view"):
        store.features(view=4)
    x = store.to_dask(view=2).compute()
    np.testing.assert_array_equal(x, full[:, 2])


def test_views_array_needs_views(tmp_path):
    data = synthetic_data(50, seed=3)
    url = write_synthetic_store(
        str(tmp_path / "s.zarr"), data, synthetic_identity(data), chunk_rows=16
    )
    with pytest.raises(StoreInputError, match="no augmented views"):
        open_store(url).views_array()


def test_selection_by_split_and_torch(tmp_path):
    data = synthetic_data(900, dim=16, skip_every=7, seed=4)
    url = write_synthetic_store(
        str(tmp_path / "s.zarr"), data, synthetic_identity(data), chunk_rows=100
    )
    store = open_store(url)
    split = np.array(data.split)
    assert store.splits() == ["train", "val", "test"]
    total = 0
    for name in store.splits():
        mask = data.valid & (split == name)
        np.testing.assert_array_equal(
            store.features(name), expected_features(data, "float16")[mask]
        )
        np.testing.assert_array_equal(store.labels(name), data.labels[mask])
        assert store.ids(name) == np.array(data.ids)[mask].tolist()
        total += mask.sum()
    assert total == data.valid.sum()
    x, y = store.to_torch("test", device="cpu")
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(y), 16)
    np.testing.assert_array_equal(x.numpy(), store.features("test"))
    with pytest.raises(StoreInputError, match="unknown split"):
        store.features("training")


def test_compressed_store_roundtrips(tmp_path):
    data = synthetic_data(400, dim=16, seed=5)
    for name in ["zstd", "lz4"]:
        url = write_synthetic_store(
            str(tmp_path / f"{name}.zarr"),
            data,
            synthetic_identity(data),
            chunk_rows=128,
            compressor=name,
        )
        store = open_store(url)
        assert store.attrs["compressor"] == name and not store._features.direct
        np.testing.assert_array_equal(store.features(), expected_features(data, "float16"))
    with pytest.raises(StoreInputError, match="unknown compressor"):
        open_synthetic_writer(
            str(tmp_path / "x.zarr"), data, synthetic_identity(data), compressor="brotli"
        )


def test_dask_mean_equals_numpy_mean(tmp_path):
    data = synthetic_data(1500, dim=32, skip_every=11, seed=6)
    url = write_synthetic_store(
        str(tmp_path / "s.zarr"), data, synthetic_identity(data), chunk_rows=256
    )
    store = open_store(url)
    x = store.to_dask()
    assert isinstance(x, da.Array) and x.dtype == np.float32 and x.chunks[0][0] == 256
    valid = store.valid_mask()
    mean = x[valid].mean(axis=0).compute()
    np.testing.assert_allclose(mean, store.features().mean(axis=0), rtol=1e-5, atol=1e-6)
    assert store.to_dask(rows=600).chunks[0][0] == 512
    std = x[valid].std(axis=0).compute()
    np.testing.assert_allclose(std, store.features().std(axis=0), rtol=1e-4)


@settings(deadline=None, max_examples=25)
@given(
    rows=st.integers(1, 700),
    prefetch=st.integers(0, 3),
    split=st.sampled_from([None, "train", "val", "test"]),
)
def test_iter_chunks_covers_each_selected_row_exactly_once(chunked_store, rows, prefetch, split):
    store, data = chunked_store
    mask = data.valid if split is None else data.valid & (np.array(data.split) == split)
    blocks = list(store.iter_chunks(split, rows=rows, prefetch=prefetch))
    x = np.concatenate([b[0] for b in blocks]) if blocks else np.empty((0, store.dim), np.float32)
    y = np.concatenate([b[1] for b in blocks]) if blocks else np.empty(0, np.int64)
    np.testing.assert_array_equal(x, expected_features(data, "float16")[mask])  # order kept, no dup
    np.testing.assert_array_equal(y, data.labels[mask])
    assert all(
        b[0].dtype == np.float32 and b[1].dtype == np.int64 and len(b[0]) > 0 for b in blocks
    )


@pytest.fixture(scope="module")
def chunked_store(tmp_path_factory):
    data = synthetic_data(1000, dim=8, skip_every=9, seed=7)
    url = str(tmp_path_factory.mktemp("iter") / "s.zarr")
    write_synthetic_store(url, data, synthetic_identity(data), chunk_rows=96)
    return open_store(url), data


def _prefetchers() -> set[threading.Thread]:
    """The live producer threads of `iter_chunks` (`stores.prefetch`)."""
    return {t for t in threading.enumerate() if t.name == "stores-prefetch" and t.is_alive()}


def test_iter_chunks_stops_cleanly_when_consumer_breaks(chunked_store):
    store, data = chunked_store
    before = _prefetchers()
    it = store.iter_chunks(rows=96, prefetch=2)
    first = next(it)
    started = _prefetchers() - before
    assert len(started) == 1  # a producer runs ahead of the consumer ...
    it.close()
    assert not any(t.is_alive() for t in started)  # ... and is stopped (joined) by close()
    np.testing.assert_array_equal(
        first[0], expected_features(data, "float16")[:96][data.valid[:96]]
    )


@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_direct_reads_equal_zarr_reads(row_reader_array, data):
    array, root = row_reader_array
    direct, plain = RowReader(array, local_root=root), RowReader(array, local_root=None)
    assert direct.direct and not plain.direct
    n = array.shape[0]
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    np.testing.assert_array_equal(direct.read(lo, hi), array[lo:hi])
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    view = data.draw(st.sampled_from([(), (0,), (2,), (slice(1, None),)]))
    expected = np.asarray(array[:])[mask][(slice(None), *view)].astype(np.float32)
    np.testing.assert_array_equal(gather_rows(direct, mask, index=view), expected)
    np.testing.assert_array_equal(gather_rows(plain, mask, index=view), expected)


@pytest.fixture(scope="module")
def row_reader_array(tmp_path_factory):
    """(203, 3, 5) float16 array, 32-row chunks, some chunks never written (fill value 7)."""
    root = str(tmp_path_factory.mktemp("rows") / "g.zarr")
    group = zarr.open_group(root, mode="w")
    array = group.create_array(
        "a", shape=(203, 3, 5), chunks=(32, 3, 5), dtype="float16", compressors=None, fill_value=7
    )
    values = np.random.default_rng(0).standard_normal((203, 3, 5)).astype(np.float16)
    array[0:64] = values[0:64]
    array[128:203] = values[128:203]  # chunks 2..3 stay unwritten
    return array, root


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no embedding store"):
        open_store(str(tmp_path / "nothing.zarr"))
    data = synthetic_data(64, seed=8)
    url = str(tmp_path / "partial.zarr")
    with open_synthetic_writer(url, data, synthetic_identity(data), chunk_rows=16) as writer:
        write_chunks(writer, data, [0])
    with pytest.raises(StoreIncompleteError, match="not complete"):
        open_store(url)
    partial = open_store(url, require_complete=False)
    assert not partial.complete and partial.valid_mask().sum() == 16


def test_list_stores_sorted_summaries(tmp_path):
    root = str(tmp_path / "root")
    made = []
    for backbone, n in [("test_vit", 40), ("test_resnet", 30)]:
        data = synthetic_data(n, dim=4, seed=n)
        identity = synthetic_identity(data, backbone=backbone)
        made.append(write_synthetic_store(store_url(root, identity), data, identity, chunk_rows=16))
    other = synthetic_data(20, dim=6, seed=9)
    identity = synthetic_identity(other, dataset="alpha")
    with open_synthetic_writer(store_url(root, identity), other, identity, chunk_rows=16):
        pass  # left incomplete
    summaries = list_stores(root)
    assert [s.url for s in summaries] == sorted(s.url for s in summaries)
    assert [(s.dataset, s.backbone, s.n, s.dim, s.complete) for s in summaries] == [
        ("alpha", "test_vit", 20, 6, False),
        ("synthetic", "test_resnet", 30, 4, True),
        ("synthetic", "test_vit", 40, 4, True),
    ]
    assert all(len(s.key) == 64 and s.url.endswith(f"-{s.key[:12]}.zarr") for s in summaries)
    assert open_store(summaries[1].url).n == 30
    assert list_stores(str(tmp_path / "missing")) == []
    mem = f"memory://carrot-list-{uuid.uuid4().hex}"
    data = synthetic_data(10, seed=10)
    identity = synthetic_identity(data)
    write_synthetic_store(store_url(mem, identity), data, identity, chunk_rows=8)
    assert [s.url for s in list_stores(mem)] == [store_url(mem, identity)]
