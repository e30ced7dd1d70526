"""Stage 1 end to end through ``pipeline.embed`` (no Prefect): store, skips, cache, keys, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.backbone import BackboneConfig
from pipeline.embed import EmbedSettings, run_embedding
from pipeline.extract import ExtractConfig
from stores import open_store, verify_store

MODEL = "test_resnet"


def _settings(data: Path | str, root: Path, **kw) -> EmbedSettings:
    extract = kw.pop("extract", ExtractConfig(batch_size=8, num_workers=0))
    return EmbedSettings(
        data=str(data),
        backbone=BackboneConfig(name=kw.pop("backbone", MODEL), seed=kw.pop("seed", 0)),
        extract=extract,
        root=str(root),
        chunk_rows=kw.pop("chunk_rows", 8),
        **kw,
    )


def test_embed_folder_writes_a_verified_store_and_records_the_corrupt_image(
    shapes_folder, tmp_path
):
    s = run_embedding(_settings(shapes_folder, tmp_path))
    assert not s.cache_hit and s.dim > 0 and s.n > 0
    assert verify_store(s.store).ok
    assert len(s.skipped) == 1 and "square/" in s.skipped[0]
    store = open_store(s.store)
    assert store.n == s.n and store.features().shape == (s.n - 1, s.dim)
    assert store.attrs["complete"] is True
    assert store.identity.backbone == MODEL and store.identity.weights["kind"] == "random"
    assert Path(s.store).parent.name == "shapes" and Path(s.store).name.startswith(MODEL + "-")


def test_cache_hit_does_no_backbone_work(shapes_folder, tmp_path, monkeypatch):
    first = run_embedding(_settings(shapes_folder, tmp_path))
    import pipeline.embed as embed_mod

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not build the backbone")

    monkeypatch.setattr(embed_mod, "create_backbone", refuse)
    again = run_embedding(_settings(shapes_folder, tmp_path))
    assert again.cache_hit and again.store == first.store and again.key == first.key


def test_any_input_change_gives_a_new_key(shapes_folder, tmp_path):
    base = run_embedding(_settings(shapes_folder, tmp_path))
    other_seed = run_embedding(_settings(shapes_folder, tmp_path, seed=1))
    other_dtype = run_embedding(_settings(shapes_folder, tmp_path, dtype="float32"))
    other_size = _settings(shapes_folder, tmp_path)
    other_size = EmbedSettings(
        **{**other_size.__dict__, "backbone": BackboneConfig(name=MODEL, image_size=96)}
    )
    keys = {base.key, other_seed.key, other_dtype.key, run_embedding(other_size).key}
    assert len(keys) == 4


def test_changing_one_image_file_changes_the_key(tmp_path):
    from image_factory import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=3, odd=False, corrupt=False)
    first = run_embedding(_settings(data, tmp_path / "stores"))
    victim = sorted(data.glob("circle/*.png"))[0]
    from PIL import Image

    Image.new("RGB", (40, 40), (255, 0, 0)).save(victim)
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = run_embedding(_settings(data, tmp_path / "stores"))
    assert second.key != first.key and not second.cache_hit


def test_views_are_stored_beside_the_clean_view(shapes_folder, tmp_path):
    s = run_embedding(
        _settings(
            shapes_folder, tmp_path, extract=ExtractConfig(batch_size=8, num_workers=0, views=2)
        )
    )
    store = open_store(s.store)
    assert store.views == 2
    arr = zarr.open_group(s.store, mode="r")["features"]
    assert arr.shape == (s.n, 3, s.dim)
    assert store.views_array().shape == (s.n - 1, 2, s.dim)
    assert not np.allclose(store.views_array()[:, 0], store.features())


def test_digits_source_embeds(tmp_path):
    s = run_embedding(
        _settings(
            "sklearn:digits",
            tmp_path,
            backbone="test_vit",
            chunk_rows=1024,
            extract=ExtractConfig(batch_size=256, num_workers=0),
        )
    )
    store = open_store(s.store)
    assert s.n == 1797 and store.class_names == [str(i) for i in range(10)]
    assert set(store.splits()) == {"train", "val", "test"}
    assert verify_store(s.store).ok


_CHILD = """
import sys, time
from pipeline.embed import run_embedding, EmbedSettings
from pipeline.backbone import BackboneConfig
from pipeline.extract import ExtractConfig
settings = EmbedSettings(data=sys.argv[1], root=sys.argv[2], chunk_rows=4,
                         backbone=BackboneConfig(name="test_resnet"),
                         extract=ExtractConfig(batch_size=4, num_workers=0))
def slow(n):
    print("chunk", flush=True)
    time.sleep(0.4)
run_embedding(settings, progress=slow)
"""


def test_kill_9_mid_run_resumes_to_the_same_store(shapes_folder, tmp_path):
    ref = run_embedding(
        _settings(
            shapes_folder,
            tmp_path / "ref",
            chunk_rows=4,
            extract=ExtractConfig(batch_size=4, num_workers=0),
        )
    )
    root = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(shapes_folder), str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    for _ in range(2):  # two chunks written, then kill -9 in the middle of the run
        assert proc.stdout.readline().startswith("chunk")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    url = str(root / Path(ref.store).relative_to(tmp_path / "ref"))
    with pytest.raises(Exception, match="complete"):
        open_store(url)  # not marked complete after the kill
    resumed = run_embedding(
        _settings(
            shapes_folder, root, chunk_rows=4, extract=ExtractConfig(batch_size=4, num_workers=0)
        )
    )
    assert not resumed.cache_hit and resumed.key == ref.key
    a, b = zarr.open_group(ref.store, mode="r"), zarr.open_group(resumed.store, mode="r")
    for name in ("features", "labels", "ids", "split", "valid", "errors", "progress"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert verify_store(resumed.store).ok
