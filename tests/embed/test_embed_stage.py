"""Stage 1 end to end through ``pipeline.embed.run`` (no Prefect): store, skips, cache, keys, resume."""

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

from pipeline.embed.backbone import BackboneConfig
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding
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
    import pipeline.embed.run as embed_mod

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
from pipeline.embed.run import run_embedding, EmbedSettings
from pipeline.embed.backbone import BackboneConfig
from pipeline.embed.extract import ExtractConfig
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


# --------------------------------------------------------------------------- bad input, early


def _no_backbone(monkeypatch):
    import pipeline.embed.run as embed_mod

    def refuse(*a, **k):
        raise AssertionError("bad input must be refused before a backbone is built")

    monkeypatch.setattr(embed_mod, "create_backbone", refuse)


def test_a_single_class_is_refused_before_any_work(tmp_path, monkeypatch):
    from image_factory import make_shapes_folder

    from pipeline.embed.run import check_settings
    from pipeline.errors import InputError

    data = make_shapes_folder(tmp_path / "one", per_class=4, odd=False, corrupt=False)
    for cls in ("square", "triangle"):
        for f in (data / cls).iterdir():
            f.unlink()
        (data / cls).rmdir()
    _no_backbone(monkeypatch)
    for step in (check_settings, run_embedding):
        with pytest.raises(
            InputError, match=r"has one class 'circle'; a classifier needs at least 2"
        ):
            step(_settings(data, tmp_path / "stores"))
    assert not (tmp_path / "stores").exists()


def test_check_settings_refuses_unusable_checkpoints(tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    from pipeline.embed.run import check_settings
    from pipeline.errors import InputError

    torch.manual_seed(0)
    sd = timm.create_model(MODEL, num_classes=0).state_dict()
    sd["conv1.0.weight"][0] = float("nan")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "nan.safetensors")
    vit = timm.create_model("test_vit", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in vit.items()}, tmp_path / "vit.safetensors")
    (tmp_path / "notes.pth").write_text("a text file\n")
    _no_backbone(monkeypatch)
    cases = {
        "nan.safetensors": r"nan.safetensors' holds NaN/Inf in tensor 'conv1.0.weight'",
        "vit.safetensors": "does not fit ResNet",
        "notes.pth": "is not a PyTorch checkpoint",
    }
    for name, needle in cases.items():
        s = _settings("sklearn:digits", tmp_path / "stores")
        s = EmbedSettings(
            **{**s.__dict__, "backbone": BackboneConfig(MODEL, checkpoint=str(tmp_path / name))}
        )
        with pytest.raises(InputError, match=needle):
            check_settings(s)


# --------------------------------------------------------------------------- cache key


def _edit_keeping_size_and_mtime(f: Path) -> None:
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_content_fingerprint_catches_an_edit_the_default_misses(tmp_path):
    from image_factory import make_shapes_folder

    from pipeline.embed.run import check_settings

    data = make_shapes_folder(tmp_path / "data", per_class=3, odd=False, corrupt=False)
    stat_s = _settings(data, tmp_path / "stores")
    content_s = _settings(data, tmp_path / "stores", fingerprint="content")
    assert check_settings(stat_s).identity.extra == {"view_seed": 0, "precision": "fp32"}
    first = run_embedding(content_s)
    assert open_store(first.store).identity.extra["fingerprint"] == "content"
    assert run_embedding(content_s).cache_hit  # nothing changed: reused
    stat_first = run_embedding(stat_s)
    assert stat_first.key != first.key
    _edit_keeping_size_and_mtime(sorted(data.glob("circle/*.png"))[0])
    assert run_embedding(stat_s).cache_hit  # the documented blind spot of --fingerprint stat
    again = run_embedding(content_s)
    assert not again.cache_hit and again.key != first.key


def test_fingerprint_setting_is_checked():
    from pipeline.errors import InputError

    with pytest.raises(
        InputError, match="unknown fingerprint mode 'sha'; use one of stat, content"
    ):
        EmbedSettings(data="sklearn:digits", backbone=BackboneConfig(MODEL), fingerprint="sha")


def test_outside_paths_record_their_root_and_normal_data_does_not(tmp_path):
    from image_factory import draw_shape, make_csv_manifest, save_as

    from pipeline.embed.run import check_settings
    from pipeline.errors import InputError

    csv_path = make_csv_manifest(tmp_path / "data", per_class=3)
    plain = check_settings(_settings(csv_path, tmp_path / "stores"))
    assert "id_root" not in plain.identity.extra
    save_as(draw_shape("circle"), tmp_path / "far" / "c.png", "RGB")
    with csv_path.open("a") as f:
        f.write("../far/c.png,round thing,train\n")
    with pytest.raises(InputError, match="--allow-outside-paths"):
        check_settings(_settings(csv_path, tmp_path / "stores"))
    plan = check_settings(_settings(csv_path, tmp_path / "stores", allow_outside_paths=True))
    assert plan.identity.extra["id_root"] == str(tmp_path.resolve())
    assert "far/c.png" in [r.id for r in plan.source.records]
    s = run_embedding(_settings(csv_path, tmp_path / "stores", allow_outside_paths=True))
    assert not s.skipped and open_store(s.store).identity.extra["id_root"] == str(
        tmp_path.resolve()
    )


def test_an_animated_gif_is_embedded(tmp_path):
    from image_factory import make_shapes_folder, write_animated_gif

    data = make_shapes_folder(tmp_path / "data", per_class=2, odd=False, corrupt=False)
    write_animated_gif(data / "square" / "anim.gif", [(0, 0, 200), (200, 0, 0)])
    s = run_embedding(_settings(data, tmp_path / "stores"))
    store = open_store(s.store)
    assert s.n == 7 and not s.skipped and "square/anim.gif" in list(store.ids())


def test_in_memory_data_gets_one_fingerprint_but_two_keys(tmp_path):
    """sklearn digits hash their pixels in both modes (the same input fingerprint); the store
    key still tells the modes apart, through ``fingerprint: "content"`` in the identity."""
    from pipeline.embed.run import check_settings

    stat = check_settings(_settings("sklearn:digits", tmp_path))
    content = check_settings(_settings("sklearn:digits", tmp_path, fingerprint="content"))
    assert stat.identity.input_fingerprint == content.identity.input_fingerprint
    assert "fingerprint" not in stat.identity.extra
    assert content.identity.extra["fingerprint"] == "content"
    assert stat.identity.key() != content.identity.key() and stat.url != content.url
