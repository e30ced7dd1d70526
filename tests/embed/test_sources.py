"""resolve_source: every DATA kind, splits, deterministic order, fingerprints, clear errors."""

from __future__ import annotations

import math
import os
import pickle
import shutil
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from image_factory import (
    CORRUPT_NAME,
    SHAPES,
    make_csv_manifest,
    make_shapes_folder,
    make_split_folder,
)

from pipeline.embed.images import ImageLoadError
from pipeline.embed.sources import ImageSource, resolve_source
from pipeline.embed.splits import assign_splits
from pipeline.errors import InputError


def _splits(src: ImageSource) -> Counter:
    return Counter(r.split for r in src.records)


# --------------------------------------------------------------------------- ImageFolder


def test_folder_classes_order_and_files(shapes_folder):
    src = resolve_source(str(shapes_folder))
    assert (src.kind, src.name, src.location) == ("folder", "shapes", str(shapes_folder))
    assert src.class_names == SHAPES
    ids = [r.id for r in src.records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len(src) == 3 * 6 + 6 + 1  # plain + odd-mode + corrupt; .txt and hidden ignored
    assert "triangle/odd_upper.JPG" in ids  # upper-case extension accepted
    assert not any(i.endswith(".txt") or i.startswith(".") for i in ids)
    for r in src.records:
        assert src.class_names[r.label] == r.id.split("/")[0]


def test_folder_splits_stratified_and_seeded(shapes_folder):
    a = resolve_source(str(shapes_folder), val_fraction=0.2, test_fraction=0.3, seed=1)
    b = resolve_source(str(shapes_folder), val_fraction=0.2, test_fraction=0.3, seed=1)
    c = resolve_source(str(shapes_folder), val_fraction=0.2, test_fraction=0.3, seed=2)
    assert a == b
    assert a.records != c.records
    counts = _splits(a)
    assert counts["test"] == 8 and counts["val"] >= 4 and counts["train"] > counts["test"]
    for split in ("train", "val", "test"):  # every class in every split (stratified)
        assert {r.label for r in a.records if r.split == split} == {0, 1, 2}


def test_folder_loads_and_skips_corrupt(shapes_folder):
    src = resolve_source(str(shapes_folder))
    for i, r in enumerate(src.records):
        if r.id.endswith(CORRUPT_NAME):
            with pytest.raises(ImageLoadError) as err:
                src.load(i)
            assert err.value.image_id == r.id
        else:
            img = src.load(i)
            assert img.mode == "RGB" and img.size == (48, 40)


def test_folder_split_subfolders(tmp_path):
    root = make_split_folder(tmp_path / "sp", per_class=10)
    src = resolve_source(str(root), val_fraction=0.3, seed=0)
    given_test = [r for r in src.records if r.id.startswith("test/")]
    assert {r.split for r in given_test} == {"test"}  # the given test split is kept as is
    train_dir = [r for r in src.records if r.id.startswith("train/")]
    assert {r.split for r in train_dir} == {"train", "val"}  # val carved from train/ only
    assert sum(r.split == "val" for r in train_dir) == 9  # ceil(0.3 × 30)
    assert src.class_names == SHAPES


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match=r"does not exist.*sklearn:digits"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"is empty.*one sub-folder per class"):
        resolve_source(str(tmp_path / "empty"))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"x")
    (flat / "cls").mkdir()
    with pytest.raises(InputError, match="no class sub-folders with images"):
        resolve_source(str(flat))
    mixed = make_split_folder(tmp_path / "mixed", per_class=2)
    shutil.copytree(mixed / "train" / "circle", mixed / "circle")
    with pytest.raises(InputError, match=r"mixes split folders.*'circle'"):
        resolve_source(str(mixed))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match=r"not a \.csv manifest"):
        resolve_source(str(tmp_path / "x.json"))
    with pytest.raises(InputError, match="val_fraction"):
        resolve_source(str(mixed), val_fraction=1.5)
    with pytest.raises(InputError, match="leaves no training"):
        resolve_source(str(mixed), val_fraction=0.5, test_fraction=0.5)


def test_fingerprint_tracks_files_and_settings(tmp_path):
    root = make_shapes_folder(tmp_path / "fp", per_class=3, odd=False, corrupt=False)
    a = resolve_source(str(root))
    before = a.fingerprint()
    assert before == resolve_source(str(root)).fingerprint()
    assert len(before) == 64
    assert resolve_source(str(root), seed=5).fingerprint() != before
    f = root / a.records[0].id
    st_ = f.stat()
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))  # touched file
    assert a.fingerprint() != before  # computed from the files as they are now
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert a.fingerprint() == before
    f.write_bytes(f.read_bytes() + b"\0")  # changed size
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert a.fingerprint() != before


def test_source_pickles_and_loads_in_copy(shapes_folder):
    src = resolve_source(str(shapes_folder))
    copy = pickle.loads(pickle.dumps(src))
    assert copy == src
    np.testing.assert_array_equal(np.asarray(copy.load(0)), np.asarray(src.load(0)))
    assert copy.fingerprint() == src.fingerprint()


def test_labels_and_indices(shapes_folder):
    src = resolve_source(str(shapes_folder))
    assert src.labels.dtype == np.int64 and src.labels.shape == (len(src),)
    parts = [src.indices(s) for s in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(src)))
    with pytest.raises(InputError, match="unknown split"):
        src.indices("holdout")


# --------------------------------------------------------------------------- CUB / NABirds


def test_cub_root(cub_root):
    src = resolve_source(str(cub_root), val_fraction=0.2)
    assert (src.kind, src.name) == ("cub", "cub200")
    assert src.class_names == ("001.Circle_Shape", "002.Square_Shape", "003.Triangle_Shape")
    assert len(src) == 12
    by_id = {r.id: r for r in src.records}
    # train_test_split.txt: even image index → train (1), odd → test (0); val only from train
    for r in src.records:
        i = int(r.id.rsplit("_", 1)[1].split(".")[0])
        assert r.split in (("train", "val") if i % 2 == 0 else ("test",))
    assert _splits(src)["val"] == 2  # ceil(0.2 × 6 train images)
    assert by_id["002.Square_Shape/square_0001.jpg"].label == 1
    assert src.load(0).size == (48, 40)


def test_nabirds_root(nabirds_root):
    src = resolve_source(str(nabirds_root), val_fraction=0.0)
    assert (src.kind, src.name) == ("nabirds", "nabirds")
    # sparse ids 295, 313, 1000 → 0, 1, 2 in id order; unused hierarchy nodes are not classes
    assert src.class_names == ("Bald Eagle", "Red tailed Hawk", "Snowy Owl (adult)")
    assert {r.id.split("/")[0]: r.label for r in src.records} == {"0295": 0, "0313": 1, "1000": 2}
    assert _splits(src) == Counter(train=9, test=3)
    assert src.load(len(src) - 1).mode == "RGB"


def test_cub_errors(tmp_path, cub_root):
    broken = tmp_path / "broken"
    shutil.copytree(cub_root, broken)
    (broken / "train_test_split.txt").unlink()
    with pytest.raises(InputError, match=r"lacks \['train_test_split.txt'\]"):
        resolve_source(str(broken))
    shutil.copy(cub_root / "train_test_split.txt", broken)
    with (broken / "image_class_labels.txt").open("a") as f:
        f.write("garbage\n")
    with pytest.raises(InputError, match=r"image_class_labels\.txt.*malformed"):
        resolve_source(str(broken))


# --------------------------------------------------------------------------- CSV


def test_csv_manifest_with_header(csv_manifest):
    src = resolve_source(str(csv_manifest))
    assert (src.kind, src.name) == ("csv", "manifest")
    assert src.class_names == ("box", "round thing", "wedge")  # sorted label strings
    assert _splits(src) == Counter(train=9, val=3, test=3)  # the given splits
    assert src.records[0].id == "img/circle-0.png" and src.records[0].split == "test"
    assert src.class_names[src.records[0].label] == "round thing"
    assert src.load(0).size == (48, 40)


def test_csv_without_header_or_split(tmp_path):
    path = make_csv_manifest(tmp_path, header=False, split=False)
    src = resolve_source(str(path), val_fraction=0.2, test_fraction=0.2)
    assert src.class_names == ("box", "round thing", "wedge")
    assert _splits(src) == Counter(train=9, val=3, test=3)  # made, stratified
    assert resolve_source(str(path), val_fraction=0.2, test_fraction=0.2) == src


def test_csv_errors(tmp_path):
    make_csv_manifest(tmp_path)
    cases = {
        "cols.csv": ("path,kind\nimg/circle-0.png,a\n", r"lacks column\(s\) \['label'\]"),
        "missing.csv": ("path,label\nimg/nope.png,a\n", r"do not exist.*img/nope.png"),
        "partial.csv": (
            "path,label,split\nimg/circle-0.png,a,train\nimg/circle-1.png,a,\n",
            "filled for some rows only",
        ),
        "badsplit.csv": ("img/circle-0.png,a,holdout\n", "unknown split 'holdout'"),
        "wide.csv": ("a,b,c,d\n", "4 column"),
        "empty.csv": ("\n\n", "is empty"),
        "dupes.csv": ("img/circle-0.png,a\nimg/circle-0.png,b\n", "more than once"),
        "blank.csv": ("img/circle-0.png,\n", "empty path or label"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message):
            resolve_source(str(tmp_path / name))


# --------------------------------------------------------------------------- sklearn


def test_sklearn_digits():
    src = resolve_source("sklearn:digits")
    assert (src.kind, src.name, src.root) == ("sklearn", "digits", "")
    assert len(src) == 1797 and src.class_names == tuple(str(d) for d in range(10))
    assert src.records[42].id == "digits/00042"
    img = src.load(0)
    a = np.asarray(img)
    assert img.mode == "RGB" and a.shape == (32, 32, 3) and a.dtype == np.uint8
    from sklearn.datasets import load_digits

    raw = load_digits().images[0]  # (8, 8) float in 0..16
    expect = np.rint(raw * 255 / 16).astype(np.uint8).repeat(4, 0).repeat(4, 1)  # nearest ×4
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], expect)
    assert max(int(np.asarray(src.load(i)).max()) for i in range(20)) == 255  # 16 → 255
    counts = _splits(src)
    assert abs(counts["test"] - 0.2 * 1797) <= 1 and abs(counts["val"] - 0.1 * 1797) <= 2
    test_labels = Counter(r.label for r in src.records if r.split == "test")
    assert min(test_labels.values()) >= 34  # stratified: ~36 per class
    assert src.fingerprint() == resolve_source("sklearn:digits").fingerprint()
    assert src.path(0) is None


def test_sklearn_unknown_name():
    with pytest.raises(InputError, match="available: sklearn:digits"):
        resolve_source("sklearn:iris")


# --------------------------------------------------------------------------- splits


def _carve_bounds(pool_labels: list[int], fraction: float) -> tuple[int, int]:
    """(fewest, most) images ``carve`` may take from a pool with these labels: at most
    ⌈fraction·n⌉ (and one fewer than the images of classes with ≥ 2 in the pool, which alone
    are carved); at least that minus one image per such class (the put-back that keeps every
    class in the pool)."""
    counts = Counter(pool_labels)
    eligible = sum(k for k in counts.values() if k >= 2)
    if fraction <= 0 or len(pool_labels) < 2 or eligible < 2:
        return 0, 0
    most = min(math.ceil(fraction * len(pool_labels)), len(pool_labels) - 1, eligible - 1)
    return max(0, most - sum(k >= 2 for k in counts.values())), most


@settings(deadline=None, max_examples=60)
@given(
    counts=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    val=st.sampled_from([0.0, 0.1, 0.25]),
    test=st.sampled_from([0.0, 0.2, 0.3]),
    seed=st.integers(0, 1000),
)
def test_property_assign_splits(counts, val, test, seed):
    """Every image gets one split; same seed → same splits; sizes follow the fractions (test:
    ⌈test·N⌉ of all images, val: ⌈val/(1 − test)·rest⌉ of the rest, less what the fallbacks
    put back); every class keeps at least one training image."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    out = assign_splits(labels, None, val_fraction=val, test_fraction=test, seed=seed)
    assert out == assign_splits(labels, None, val_fraction=val, test_fraction=test, seed=seed)
    assert len(out) == len(labels) and set(out) <= {"train", "val", "test"}
    lo, hi = _carve_bounds(labels, test)
    assert lo <= out.count("test") <= hi, (out.count("test"), lo, hi)
    rest = [lab for s, lab in zip(out, labels, strict=True) if s != "test"]
    lo, hi = _carve_bounds(rest, val / (1.0 - test))
    assert lo <= out.count("val") <= hi, (out.count("val"), lo, hi)
    for c in range(len(counts)):
        assert "train" in [s for s, lab in zip(out, labels, strict=True) if lab == c]


def test_assign_splits_stratifies_when_possible():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    out = assign_splits(labels, None, val_fraction=0.1, test_fraction=0.2, seed=0)
    test = Counter(lab for s, lab in zip(out, labels, strict=True) if s == "test")
    assert test == Counter({0: 10, 1: 6, 2: 4})
    val = Counter(lab for s, lab in zip(out, labels, strict=True) if s == "val")
    assert val == Counter({0: 5, 1: 3, 2: 2})
