"""extract_rows on real timm models and real images: shapes, determinism, skip/strict, OOM."""

from __future__ import annotations

import os
import pickle
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.embed.backbone import BackboneConfig, create_backbone
from pipeline.embed.extract import (
    ExtractConfig,
    NonFiniteFeaturesError,
    extract_rows,
    resolve_num_workers,
    view_seed_for,
)
from pipeline.embed.sources import resolve_source
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def digits():
    return resolve_source("sklearn:digits")


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(BackboneConfig("test_resnet", image_size=48, device="cpu"))


def _cfg(**kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    return ExtractConfig(**kw)


def test_shapes_with_and_without_views(backbone, digits):
    plain = extract_rows(backbone, digits, range(0, 20), _cfg())
    assert plain.features.shape == (20, backbone.dim) and plain.features.dtype == np.float32
    assert plain.valid.all() and plain.errors == [""] * 20 and plain.seconds > 0
    multi = extract_rows(backbone, digits, range(0, 20), _cfg(views=2))
    assert multi.features.shape == (20, 3, backbone.dim)
    # index 0 = clean view (computed in other batches: equal up to float rounding)
    np.testing.assert_allclose(multi.features[:, 0], plain.features, rtol=1e-4, atol=1e-6)
    assert not np.allclose(multi.features[:, 1], multi.features[:, 0])
    assert not np.allclose(multi.features[:, 1], multi.features[:, 2])


def test_matches_a_plain_forward_of_the_timm_transform(backbone, digits):
    res = extract_rows(backbone, digits, range(5, 15), _cfg())
    tf = backbone.transform()
    x = torch.stack([tf(digits.load(i)) for i in range(5, 15)])
    np.testing.assert_array_equal(res.features, backbone.forward(x).numpy())


def test_deterministic_and_resumable(backbone, digits):
    whole = extract_rows(backbone, digits, range(0, 40), _cfg(views=1, view_seed=3))
    again = extract_rows(backbone, digits, range(0, 40), _cfg(views=1, view_seed=3))
    np.testing.assert_array_equal(whole.features, again.features)
    # a batch-aligned sub-range (a resumed chunk) equals the slice of the whole run exactly
    part = extract_rows(backbone, digits, range(16, 32), _cfg(views=1, view_seed=3))
    np.testing.assert_array_equal(part.features, whole.features[16:32])
    # an unaligned one differs at most by float rounding of other batch shapes
    odd = extract_rows(backbone, digits, range(5, 13), _cfg(views=1, view_seed=3))
    np.testing.assert_allclose(odd.features, whole.features[5:13], rtol=1e-5, atol=1e-5)
    other = extract_rows(backbone, digits, range(0, 40), _cfg(views=1, view_seed=4))
    np.testing.assert_array_equal(other.features[:, 0], whole.features[:, 0])
    assert not np.allclose(other.features[:, 1], whole.features[:, 1])


def test_workers_give_the_same_features(backbone, digits):
    inline = extract_rows(backbone, digits, range(0, 24), _cfg(views=1))
    pooled = extract_rows(backbone, digits, range(0, 24), _cfg(views=1, num_workers=1))
    np.testing.assert_array_equal(inline.features, pooled.features)


def test_global_rng_untouched(backbone, digits):
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    expect = (random.random(), torch.rand(1).item(), np.random.rand())
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    extract_rows(backbone, digits, range(0, 8), _cfg(views=2))
    assert (random.random(), torch.rand(1).item(), np.random.rand()) == expect


def test_unreadable_image_skipped_or_strict(shapes_folder):
    src = resolve_source(str(shapes_folder))
    b = create_backbone(BackboneConfig("test_vit", image_size=32, device="cpu"))
    bad = next(i for i, r in enumerate(src.records) if r.id.endswith("corrupt.jpg"))
    rows = range(max(0, bad - 3), min(len(src), bad + 3))
    res = extract_rows(b, src, rows, _cfg(batch_size=4, views=1))
    k = bad - rows.start
    assert res.valid.tolist() == [i != k for i in range(len(rows))]
    assert "truncated" in res.errors[k] and res.errors[:k] == [""] * k
    assert (res.features[k] == 0).all() and np.abs(res.features[res.valid]).sum() > 0
    with pytest.raises(InputError, match=r"square/corrupt\.jpg.*--strict"):
        extract_rows(b, src, rows, _cfg(batch_size=4, strict=True))
    whole = extract_rows(b, src, range(len(src)), _cfg(batch_size=4, num_workers=1))
    assert whole.valid.sum() == len(src) - 1  # odd modes (CMYK, 16-bit, P, ...) all decode


def test_out_of_memory_backs_off_to_smaller_batches(backbone, digits):
    sizes = []

    def forward(x):
        sizes.append(len(x))
        if len(x) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return backbone.forward(x)

    ref = extract_rows(backbone, digits, range(0, 20), _cfg(batch_size=8))
    res = extract_rows(backbone, digits, range(0, 20), _cfg(batch_size=8), forward=forward)
    assert sizes[:3] == [8, 4, 2]  # halved on the same batch until it fits
    assert max(sizes[3:]) == 2  # later batches keep the smaller size
    np.testing.assert_allclose(res.features, ref.features, rtol=1e-5, atol=1e-5)

    def always_oom(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        extract_rows(backbone, digits, range(0, 4), _cfg(batch_size=4), forward=always_oom)


def test_non_finite_features_name_the_images(digits):
    b = create_backbone(BackboneConfig("test_resnet", image_size=32, device="cpu", seed=1))
    with torch.no_grad():
        b.model.get_parameter("conv1.0.weight").fill_(float("nan"))
    with pytest.raises(NonFiniteFeaturesError, match="digits/00003") as err:
        extract_rows(b, digits, range(3, 6), _cfg())
    assert err.value.ids == ["digits/00003", "digits/00004", "digits/00005"]
    message = str(err.value)
    assert "--precision" not in message  # carrot embed has no such option
    assert "fp32" in message and "weights" in message and "\n" not in message
    copy = pickle.loads(pickle.dumps(err.value))
    assert str(copy) == message and copy.ids == err.value.ids


def test_config_validation_and_workers(monkeypatch):
    with pytest.raises(InputError, match="batch_size"):
        ExtractConfig(batch_size=0)
    with pytest.raises(InputError, match="num_workers"):
        ExtractConfig(num_workers="many")
    with pytest.raises(InputError, match="views"):
        ExtractConfig(views=-1)
    assert resolve_num_workers(3, n_images=1, batch_size=64) == 3
    assert resolve_num_workers("auto", n_images=128, batch_size=64) == 0  # at most two batches
    for cpus, expect in ((1, 0), (2, 1), (3, 2), (8, 4), (64, 4)):  # min(4, cpus − 1)
        monkeypatch.setattr(
            os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)), raising=False
        )
        assert resolve_num_workers("auto", n_images=129, batch_size=64) == expect, cpus


def test_view_seeds_are_distinct():
    seeds = {view_seed_for(s, r, v) for s in range(3) for r in range(50) for v in range(1, 4)}
    assert len(seeds) == 3 * 50 * 3
    assert view_seed_for(0, 7, 1) == view_seed_for(0, 7, 1)


_ORPHAN = """
import multiprocessing as mp, os, sys, time
from pipeline.embed.extract import die_with_parent

def child():
    die_with_parent(0)
    time.sleep(60)

if __name__ == "__main__":
    p = mp.get_context("fork").Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_loader_workers_die_with_a_killed_parent(tmp_path):
    """A DataLoader worker set up by the extraction loop dies at once when its process is
    killed with SIGKILL (torch's own watchdog would take up to 5 s)."""
    import signal
    import subprocess

    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    child = int(proc.stdout.readline())
    assert psutil.pid_exists(child)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and psutil.pid_exists(child):
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    gone = not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert gone, "the worker outlived its killed parent"
