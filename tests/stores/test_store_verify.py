"""Never complete unless sound: bad chunks are refused, and verify_store catches tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from stores import (
    StoreError,
    StoreIncompleteError,
    StoreInputError,
    open_store,
    open_writer,
    store_url,
    verify_store,
)
from stores.testing import (
    edit_attrs,
    open_synthetic_writer,
    synthetic_data,
    synthetic_identity,
    write_chunks,
    write_synthetic_store,
)

DATA = synthetic_data(200, dim=8, skip_every=17, seed=31)
IDENTITY = synthetic_identity(DATA)


def test_nan_in_a_valid_row_names_the_id_and_store_stays_incomplete(tmp_path):
    url = str(tmp_path / "s.zarr")
    feats = DATA.features.copy()
    feats[70, 3] = np.nan  # chunk 1 (rows 64..127), a valid row
    feats[68] = np.inf  # row 68 is invalid (68 = 4 * 17): ignored, stored as zeros
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA, [0, 2, 3])
        with pytest.raises(StoreError, match="NaN") as err:
            writer.write_chunk(
                1, feats[64:128], valid=DATA.valid[64:128], errors=DATA.errors[64:128]
            )
        assert repr(DATA.ids[70]) in str(err.value) and DATA.ids[68] not in str(err.value)
        assert writer.pending_chunks() == [1]
        with pytest.raises(StoreIncompleteError, match="1 chunks not written"):
            writer.finalize(timings={})
        feats[70, 3] = 0.0
        writer.write_chunk(1, feats[64:128], valid=DATA.valid[64:128], errors=DATA.errors[64:128])
        writer.finalize(timings={})
    assert not np.any(open_store(url).features(valid_only=False)[68])


def test_incomplete_store_is_never_marked_complete(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA, [0])
    with pytest.raises(StoreIncompleteError):
        open_store(url)
    report = verify_store(url)
    assert not report.ok
    assert any("complete marker" in p for p in report.problems)
    assert any("3 chunks not written" in p for p in report.problems)


def test_float16_overflow_is_refused(tmp_path):
    with open_synthetic_writer(str(tmp_path / "s.zarr"), DATA, IDENTITY, chunk_rows=64) as writer:
        big = DATA.features[:64] * 0 + 1e5
        with pytest.raises(StoreError, match=r"overflow float16.*float32"):
            writer.write_chunk(0, big, valid=DATA.valid[:64], errors=DATA.errors[:64])


@pytest.mark.parametrize(
    ("features", "valid", "errors", "needle"),
    [
        (np.zeros((64, 9), np.float32), np.ones(64, bool), [""] * 64, "shape"),
        (np.zeros((64, 8), np.int64), np.ones(64, bool), [""] * 64, "float"),
        (np.zeros((64, 8), np.float32), np.ones(63, bool), [""] * 64, "valid"),
        (np.zeros((64, 8), np.float32), np.ones(64, bool), [""] * 3, "errors"),
    ],
)
def test_bad_chunk_arguments(tmp_path, features, valid, errors, needle):
    with open_synthetic_writer(str(tmp_path / "s.zarr"), DATA, IDENTITY, chunk_rows=64) as writer:
        with pytest.raises(StoreInputError, match=needle):
            writer.write_chunk(0, features, valid=valid, errors=errors)
        with pytest.raises(StoreInputError, match="out of range"):
            writer.chunk_rows_range(4)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"labels": np.r_[DATA.labels[:-1], 3]}, "labels out of range"),
        ({"split": [*DATA.split[:-1], "dev"]}, "split values"),
        ({"ids": [*DATA.ids[:-1], DATA.ids[0]]}, "unique"),
        ({"labels": DATA.labels[:-1]}, "N rows"),
        ({"class_names": ["a", "a", "b"]}, "unique"),
        ({"dim": 0}, "dim"),
        ({"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_open_writer_rejects_bad_inputs(tmp_path, change, needle):
    args = dict(
        ids=DATA.ids, labels=DATA.labels, split=DATA.split, class_names=DATA.class_names, dim=8
    )
    with pytest.raises(StoreInputError, match=needle):
        open_writer(str(tmp_path / "s.zarr"), IDENTITY, **(args | change))
    assert not (tmp_path / "s.zarr").exists()  # nothing written


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    url = store_url(str(tmp_path_factory.mktemp("good")), IDENTITY)
    write_synthetic_store(url, DATA, IDENTITY, chunk_rows=64)
    return url


@pytest.fixture
def copy_of(good_store, tmp_path):
    url = str(tmp_path / Path(good_store).parent.name / Path(good_store).name)
    shutil.copytree(good_store, url)
    return url


def test_good_store_verifies(copy_of):
    report = verify_store(copy_of)
    assert report.ok and report.problems == []
    assert report.summary["n_valid"] == DATA.valid.sum() and report.summary["chunks_done"] == 4


def tamper_progress(url):
    zarr.open_group(url, mode="a")["progress"][2] = False


def tamper_complete(url):
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))


def tamper_label(url):
    zarr.open_group(url, mode="a")["labels"][5] = 99


def tamper_nan(url):
    zarr.open_group(url, mode="a")["features"][7, 2] = np.nan


def tamper_identity(url):
    doc = json.loads((Path(url) / "zarr.json").read_text())
    identity = doc["attributes"]["identity"] | {"backbone": "test_resnet"}
    edit_attrs(url, identity=identity)


def tamper_folder(url):
    shutil.move(url, url.replace(IDENTITY.key()[:12], "0" * 12))
    return url.replace(IDENTITY.key()[:12], "0" * 12)


def tamper_split(url):
    zarr.open_group(url, mode="a")["split"][3] = "holdout"


def tamper_skipped(url):
    edit_attrs(url, skipped=[])


def tamper_shape(url):
    edit_attrs(url, n=201)


def tamper_array(url):
    shutil.rmtree(Path(url) / "errors")


def tamper_chunk_file(url):
    chunk = Path(url) / "features" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (tamper_progress, "chunks not written"),
        (tamper_complete, "attributes missing"),
        (tamper_label, "labels out of range"),
        (tamper_nan, f"non-finite features (NaN/Inf) in 1 valid rows: ids {DATA.ids[7]!r}"),
        (tamper_identity, "content key recomputed from identity"),
        (tamper_folder, "folder name key prefix"),
        (tamper_split, "split values ['holdout']"),
        (tamper_skipped, "skipped attribute"),
        (tamper_shape, "expected (201,"),
        (tamper_array, "arrays missing: ['errors']"),
        (tamper_chunk_file, "truncated"),
    ],
)
def test_verify_catches_tampering(copy_of, tamper, needle):
    url = tamper(copy_of) or copy_of
    report = verify_store(url)
    assert not report.ok
    assert any(needle in p for p in report.problems), report.problems


def test_finalize_refuses_a_store_that_fails_checks(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA)
        zarr.open_group(url, mode="a")["features"][9, 0] = np.inf  # corrupted behind its back
        with pytest.raises(StoreError, match=r"failed its checks.*non-finite"):
            writer.finalize(timings={})
    assert not open_store(url, require_complete=False).complete


def test_verify_missing_store(tmp_path):
    report = verify_store(str(tmp_path / "none.zarr"))
    assert not report.ok and "no embedding store" in report.problems[0]
