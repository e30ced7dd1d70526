"""Damaged stores are never accepted as good: verify, open_store, the direct reader, finalize,
the writer's resume and the CLI all refuse missing or truncated chunks and broken metadata."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main
from stores import StoreError, StoreInputError, open_store, store_url, verify_store
from stores.errors import StoreCorruptError
from stores.schema import ROW_ARRAYS
from stores.testing import (
    edit_attrs,
    open_synthetic_writer,
    synthetic_data,
    synthetic_identity,
    write_chunks,
    write_synthetic_store,
)

DATA = synthetic_data(200, dim=8, skip_every=17, seed=31)  # 4 chunks of 64 rows, the last 8
IDENTITY = synthetic_identity(DATA)
CHUNK_FILES = {name: f"{name}/c/0" for name in ROW_ARRAYS} | {"features": "features/c/0/0"}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> str:
    url = store_url(str(tmp_path_factory.mktemp("good")), IDENTITY)
    write_synthetic_store(url, DATA, IDENTITY, chunk_rows=64)
    return url


@pytest.fixture
def store(good_store, tmp_path) -> str:
    """A fresh copy of the good store, to damage."""
    url = str(tmp_path / Path(good_store).parent.name / Path(good_store).name)
    shutil.copytree(good_store, url)
    return url


def assert_refused(url: str, *needles: str) -> StoreCorruptError:
    """open_store raises a StoreCorruptError naming the store, the verify command and the fix."""
    with pytest.raises(StoreCorruptError) as err:
        open_store(url)
    message = str(err.value)
    assert url in message and f"carrot store verify {url}" in message
    assert "carrot embed" in message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert isinstance(err.value, StoreInputError)
    return err.value


def assert_verify_fails(url: str, *needles: str) -> list[str]:
    report = verify_store(url)
    assert not report.ok
    for needle in needles:
        assert any(needle in p for p in report.problems), report.problems
    return report.problems


# -- chunk files ------------------------------------------------------------------------------


def test_good_store_opens_and_verifies(good_store):
    assert verify_store(good_store).ok
    assert open_store(good_store).features().shape == (int(DATA.valid.sum()), 8)


@pytest.mark.parametrize("name", ROW_ARRAYS)
def test_a_deleted_chunk_file_fails_verify_and_open(store, name):
    (Path(store) / CHUNK_FILES[name]).unlink()
    assert_verify_fails(store, f"{name}: chunk files missing for written chunks [0]")
    assert_refused(store, name, "missing")


def test_a_chunk_truncated_in_its_padding_fails_verify_and_open(store):
    last = Path(store) / "features" / "c" / "3" / "0"  # rows 192..199 of a 64-row chunk
    assert last.stat().st_size == 64 * 8 * 2  # zarr writes the last chunk at full size
    last.write_bytes(last.read_bytes()[: 8 * 8 * 2])  # only the padding is cut off
    assert_verify_fails(
        store, "features: chunk file features/c/3/0 is truncated (128 of 1024 bytes)"
    )
    assert_refused(store, "truncated")


def test_direct_reads_raise_instead_of_filling_zeros(store):
    opened = open_store(store)
    partial = open_store(store, require_complete=False)
    (Path(store) / "features" / "c" / "1" / "0").unlink()  # after the open-time check
    for reader in (opened, partial):
        with pytest.raises(StoreCorruptError, match=r"features/c/1/0.*carrot store verify"):
            reader.features()
        with pytest.raises(StoreCorruptError, match="missing"):
            list(reader.iter_chunks(rows=64))


def test_unwritten_chunks_of_an_incomplete_store_still_read_as_zeros(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA, [0, 2])
    partial = open_store(url, require_complete=False)
    x = partial.features(valid_only=False)
    assert not x[64:128].any() and not x[192:].any() and x[:64].any()
    report = verify_store(url)
    assert not any("missing" in p for p in report.problems), report.problems


def test_finalize_refuses_a_store_with_a_missing_chunk_file(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA)
        (Path(url) / "labels" / "c" / "2").unlink()  # lost behind the writer's back
        with pytest.raises(StoreError, match=r"failed its checks.*labels: chunk files missing"):
            writer.finalize(timings={})
    assert not open_store(url, require_complete=False).complete


def test_rewriting_repairs_missing_chunks_and_keeps_the_rest(store, good_store):
    (Path(store) / "features" / "c" / "2" / "0").unlink()
    (Path(store) / "errors" / "c" / "1").unlink()
    kept = (Path(store) / "features" / "c" / "0" / "0").stat().st_mtime_ns
    with open_synthetic_writer(store, DATA, IDENTITY, chunk_rows=64) as writer:
        assert not writer.complete and writer.pending_chunks() == [1, 2]
        write_chunks(writer, DATA)
        writer.finalize(timings={})
    assert verify_store(store).ok
    assert (Path(store) / "features" / "c" / "0" / "0").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(
        open_store(store).features(valid_only=False),
        open_store(good_store).features(valid_only=False),
    )


def garble_labels_chunk(url: str) -> None:
    chunk = Path(url) / "labels" / "c" / "1"  # zstd-compressed: its size says nothing
    chunk.write_bytes(chunk.read_bytes()[:10])


def test_a_garbled_compressed_chunk_is_named_not_a_raw_codec_error(store, capsys):
    garble_labels_chunk(store)
    opened = open_store(store)  # the open-time checks read no chunk
    with pytest.raises(StoreCorruptError, match=r"array labels: rows 0\.\.199 are unreadable"):
        opened.labels()
    assert_verify_fails(store, "array labels: rows 0..199 are unreadable")
    assert main(["store", "info", store]) == 2
    assert "labels" in one_line_error(capsys)
    assert main(["store", "verify", store]) == 1


def test_a_garbled_compressed_features_chunk_is_named(tmp_path):
    url = write_synthetic_store(
        str(tmp_path / "z.zarr"), DATA, IDENTITY, chunk_rows=64, compressor="zstd"
    )
    chunk = Path(url) / "features" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreCorruptError, match=r"array features: rows \d+\.\.\d+ are unreadable"):
        open_store(url).features()
    assert_verify_fails(url, "array features")


def test_complete_store_with_an_unset_progress_flag_is_refused_then_rewritten(store):
    zarr.open_group(store, mode="a")["progress"][2] = False  # its file is removed (fill value)
    assert_refused(store, "progress unset for chunks [2] of a complete store")
    with open_synthetic_writer(store, DATA, IDENTITY, chunk_rows=64) as writer:
        assert not writer.complete and writer.pending_chunks() == [2]
        write_chunks(writer, DATA)
        writer.finalize(timings={})
    assert verify_store(store).ok


def test_lost_ids_chunk_is_rewritten_from_the_writer_inputs(store):
    (Path(store) / "ids" / "c" / "1").unlink()
    with open_synthetic_writer(store, DATA, IDENTITY, chunk_rows=64) as writer:
        assert not writer.complete and writer.pending_chunks() == []
        writer.finalize(timings={})
    assert verify_store(store).ok and open_store(store).ids(valid_only=False) == DATA.ids


def test_rerunning_the_embedding_rewrites_a_lost_chunk(shapes_folder, tmp_path):
    """What the error message advises: `carrot embed` again rewrites only the lost chunk."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, run_embedding

    settings = EmbedSettings(
        data=str(shapes_folder),
        backbone=BackboneConfig(name="test_vit"),
        extract=ExtractConfig(batch_size=8, num_workers=0),
        root=str(tmp_path),
        chunk_rows=8,
    )
    url = run_embedding(settings).store
    before = open_store(url).features(valid_only=False)
    kept = next(Path(url, "features", "c").glob("1/*")).stat().st_mtime_ns
    shutil.rmtree(Path(url, "features", "c", "0"))
    assert_refused(url, "features", "re-run `carrot embed`")
    again = run_embedding(settings)
    assert again.store == url and not again.cache_hit
    assert verify_store(url).ok
    np.testing.assert_array_equal(open_store(url).features(valid_only=False), before)
    assert next(Path(url, "features", "c").glob("1/*")).stat().st_mtime_ns == kept
    assert run_embedding(settings).cache_hit


def test_every_chunk_file_is_stored_even_when_it_equals_the_fill_value(store):
    """errors "" everywhere in chunk 3 (no skipped rows there): still a file, so loss is visible."""
    assert DATA.valid[192:].all()
    assert (Path(store) / "errors" / "c" / "3").is_file()


def legacy(url: str, absent: list[str]) -> None:
    """Make ``url`` look like a store written before every chunk was stored, where chunks equal
    to the fill value were left out (``absent``: such chunk files)."""
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["every_chunk_stored"]
    meta.write_text(json.dumps(doc))
    for name in absent:
        (Path(url) / name).unlink()


def test_stores_written_before_every_chunk_was_stored_still_open(store):
    legacy(store, ["errors/c/3"])  # errors all "" in chunk 3
    assert verify_store(store).ok, verify_store(store).problems
    assert open_store(store).features().shape == (int(DATA.valid.sum()), 8)
    (Path(store) / "features" / "c" / "1" / "0").unlink()  # valid/c/1 still there: damage
    assert_verify_fails(store, "features: chunk files missing for written chunks [1]")
    assert_refused(store, "features")


def test_old_store_with_an_all_skipped_chunk_still_opens(tmp_path):
    valid = DATA.valid.copy()
    valid[64:128] = False
    errors = ["" if v else "unreadable" for v in valid]
    data = dataclasses.replace(DATA, valid=valid, errors=errors)
    url = write_synthetic_store(str(tmp_path / "s.zarr"), data, IDENTITY, chunk_rows=64)
    legacy(url, ["features/c/1/0", "valid/c/1"])  # all zeros / all False: never stored then
    assert verify_store(url).ok, verify_store(url).problems
    store = open_store(url)
    assert not store.features(valid_only=False)[64:128].any()
    assert store.features().shape == (int(valid.sum()), 8)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lost=st.sets(st.tuples(st.sampled_from(ROW_ARRAYS), st.integers(0, 3)), min_size=1),
    cut=st.booleans(),
)
def test_any_lost_chunk_files_are_caught(good_store, tmp_path_factory, lost, cut):
    url = str(tmp_path_factory.mktemp("h") / "s.zarr")
    shutil.copytree(good_store, url)
    for name, c in lost:
        path = Path(url, name, "c", str(c), *(["0"] if name == "features" else []))
        if cut and name == "features":
            path.write_bytes(path.read_bytes()[:-1])
        else:
            path.unlink()
    assert not verify_store(url).ok
    with pytest.raises(StoreCorruptError):
        open_store(url)


def test_memory_url_store_with_a_lost_chunk_is_refused():
    url = f"memory://integrity-{time.monotonic_ns()}/s.zarr"
    write_synthetic_store(url, DATA, IDENTITY, chunk_rows=64)
    assert verify_store(url).ok and open_store(url).n == 200
    fs = fsspec.filesystem("memory")
    fs.rm(url.removeprefix("memory://") + "/features/c/2/0")
    assert_verify_fails(url, "features: chunk files missing for written chunks [2]")
    assert_refused(url, "features")


# -- metadata ---------------------------------------------------------------------------------


def rm_labels(url: str) -> None:
    shutil.rmtree(Path(url) / "labels")


def garble_group(url: str) -> None:
    meta = Path(url) / "zarr.json"
    meta.write_text(meta.read_text()[:40])  # torn write


def garble_array(url: str) -> None:
    meta = Path(url) / "split" / "zarr.json"
    meta.write_text(meta.read_text()[:40])


def empty_array_meta(url: str) -> None:
    (Path(url) / "ids" / "zarr.json").write_text("{}")


def edit_dim(url: str) -> None:
    edit_attrs(url, dim=16)


def edit_n_type(url: str) -> None:
    edit_attrs(url, n="200")


def drop_attrs(url: str) -> None:
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"] = {}
    meta.write_text(json.dumps(doc))


DAMAGE = [
    (rm_labels, "arrays missing: ['labels']", "arrays missing: ['labels']"),
    (garble_group, "zarr.json", "zarr.json is unreadable"),
    (garble_array, "split/zarr.json", "split/zarr.json is unreadable"),
    (empty_array_meta, "ids/zarr.json", "ids/zarr.json is unreadable"),
    (edit_dim, "expected (200, 16)", "expected (200, 16)"),
    (edit_n_type, "n", "attribute n"),
]


@pytest.mark.parametrize(("damage", "refusal", "problem"), DAMAGE)
def test_broken_metadata_is_refused_and_reported(store, damage, refusal, problem):
    damage(store)
    assert_refused(store, refusal)
    problems = assert_verify_fails(store, problem)
    assert not any("Traceback" in p for p in problems)


@pytest.mark.parametrize(("damage", "refusal", "problem"), DAMAGE)
def test_broken_metadata_is_refused_even_when_incomplete_is_allowed(
    store, damage, refusal, problem
):
    damage(store)
    with pytest.raises(StoreCorruptError, match="carrot store verify"):
        open_store(store, require_complete=False)


def test_store_without_attributes_is_refused_as_never_created(store, capsys):
    drop_attrs(store)
    with pytest.raises(StoreInputError, match="never fully created") as err:
        open_store(store, require_complete=False)
    assert f"carrot store verify {store}" in str(err.value) and "carrot embed" in str(err.value)
    assert_verify_fails(store, "attributes missing")
    assert main(["store", "info", store]) == 2
    assert store in one_line_error(capsys)


def test_incomplete_store_message_names_the_command(tmp_path):
    url = str(tmp_path / "s.zarr")
    with open_synthetic_writer(url, DATA, IDENTITY, chunk_rows=64) as writer:
        write_chunks(writer, DATA, [0])
    with pytest.raises(StoreInputError) as err:
        open_store(url)
    assert f"carrot store verify {url}" in str(err.value) and "verify_store" not in str(err.value)
    assert "carrot embed" in str(err.value)


def test_open_store_stays_cheap(tmp_path, monkeypatch):
    """The open-time checks list each array once; they never read chunks (200 chunks here)."""
    import builtins

    data = synthetic_data(200 * 4, dim=4, seed=3)
    url = write_synthetic_store(
        str(tmp_path / "s.zarr"), data, synthetic_identity(data), chunk_rows=4
    )
    read: list[str] = []
    zarr_get, plain_open = zarr.storage.LocalStore.get, builtins.open

    async def recording_get(self, key, *args, **kwargs):
        if Path(self.root) == Path(url):  # this store only (other threads may read others)
            read.append(key)
        return await zarr_get(self, key, *args, **kwargs)

    def recording_open(file, *args, **kwargs):
        if isinstance(file, str | Path) and Path(file).is_relative_to(url):
            read.append(Path(file).relative_to(url).as_posix())
        return plain_open(file, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", recording_get)
    monkeypatch.setattr(builtins, "open", recording_open)
    open_store(url)
    monkeypatch.undo()
    assert read and all(k.endswith("zarr.json") for k in read), sorted(set(read))[:5]
    best = min(_timed(lambda: open_store(url)) for _ in range(5))
    assert best < 0.25, best  # measured ~10 ms; generous for a loaded machine


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- command line -----------------------------------------------------------------------------


def one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def lose_chunk(url: str) -> None:
    (Path(url) / "features" / "c" / "0" / "0").unlink()


CLI_DAMAGE = [lose_chunk, edit_dim, rm_labels, garble_group, garble_array]
TRAIN = ["--aug", "none", "--epochs", "1", "--lrs", "1e-2", "--wds", "0"]


@pytest.mark.parametrize("damage", CLI_DAMAGE)
def test_train_on_a_damaged_store_exits_2_naming_store_and_verify(store, damage, tmp_path, capsys):
    """Refused before any flow runs (so no Prefect server is needed)."""
    damage(store)
    assert main(["train", store, *TRAIN, "--out", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)
    assert store in line and f"carrot store verify {store}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", CLI_DAMAGE[1:])
def test_store_info_on_broken_metadata_exits_2(store, damage, capsys):
    damage(store)
    assert main(["store", "info", store]) == 2
    line = one_line_error(capsys)
    assert store in line and "carrot store verify" in line


@pytest.mark.parametrize("damage", CLI_DAMAGE)
def test_store_verify_reports_damage_with_exit_1(store, damage, capsys):
    damage(store)
    assert main(["store", "verify", store]) == 1
    out = capsys.readouterr()
    assert "problem" in out.out and "Traceback" not in out.err + out.out
    assert main(["store", "verify", store, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problems"]


def test_store_verify_exit_codes(good_store, tmp_path, capsys):
    assert main(["store", "verify", good_store]) == 0
    assert main(["store", "verify", str(tmp_path / "none.zarr")]) == 2
    assert "none.zarr" in one_line_error(capsys)


def test_zarr_reads_of_a_good_store_match(good_store):
    """The store written with every chunk stored still reads back exactly through Zarr."""
    group = zarr.open_group(good_store, mode="r")
    np.testing.assert_array_equal(group["errors"][:], np.asarray(DATA.errors))


@pytest.mark.parametrize(
    "encoding",
    [None, {"name": "v2", "separator": "."}, {"name": "default", "separator": "."}],
)
def test_chunk_keys_follow_the_array_encoding(tmp_path, encoding):
    from stores.integrity import chunk_key, chunk_keys

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    extra = {} if encoding is None else {"chunk_key_encoding": encoding}
    array = group.create_array("a", shape=(50, 3), chunks=(4, 3), dtype="f4", **extra)
    assert chunk_keys(array, 13) == [chunk_key(array, c) for c in range(13)]
    array[:] = 1.0
    stored = {
        p.relative_to(tmp_path / "g.zarr" / "a").as_posix()
        for p in (tmp_path / "g.zarr" / "a").rglob("*")
        if p.is_file()
    }
    assert set(chunk_keys(array, 13)) == stored - {"zarr.json"}
