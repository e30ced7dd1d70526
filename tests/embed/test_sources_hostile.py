"""resolve_source on hostile inputs: symlink loops, one file listed twice, odd encodings,
paths outside a manifest's folder, content fingerprints."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from image_factory import (
    SHAPES,
    draw_shape,
    make_csv_manifest,
    make_shapes_folder,
    make_split_folder,
    save_as,
    touch_images,
    write_animated_gif,
)

from pipeline.embed.images import ImageLoadError
from pipeline.embed.sources import resolve_source
from pipeline.errors import InputError


def _real_files(src) -> list[str]:
    return [os.path.realpath(src.path(i)) for i in range(len(src))]


# --------------------------------------------------------------------------- symlinks


def test_folder_symlink_loop_lists_each_image_once(tmp_path):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    os.symlink(".", root / "circle" / "loop")  # circle/loop/loop/... → circle
    os.symlink("..", root / "square" / "up")  # square/up → the DATA root itself
    src = resolve_source(str(root))
    assert len(src) == 6, [r.id for r in src.records]
    assert not any("loop" in r.id or "up/" in r.id for r in src.records)
    real = _real_files(src)
    assert len(set(real)) == len(real)
    assert Counter(r.label for r in src.records) == Counter({0: 2, 1: 2, 2: 2})


def test_symlinks_to_outside_folders_and_files_are_followed(tmp_path):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    outside = tmp_path / "elsewhere"
    save_as(draw_shape("circle", seed=9), outside / "more" / "c9.png", "RGB")
    save_as(draw_shape("circle", seed=8), outside / "c8.png", "RGB")
    os.symlink(outside / "more", root / "circle" / "more")
    os.symlink(outside / "c8.png", root / "circle" / "c8.png")
    src = resolve_source(str(root))
    ids = [r.id for r in src.records]
    assert "circle/more/c9.png" in ids and "circle/c8.png" in ids and len(src) == 8
    assert src.load(ids.index("circle/more/c9.png")).size == (48, 40)


def test_one_file_linked_twice_in_a_class_is_kept_once(tmp_path, caplog):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    os.symlink("circle_00.jpg", root / "circle" / "z_alias.jpg")
    (root / "circle" / "sub").mkdir()
    os.symlink("../circle_01.png", root / "circle" / "sub" / "again.png")
    with caplog.at_level("WARNING", logger="pipeline.embed.sources"):
        src = resolve_source(str(root))
    ids = [r.id for r in src.records]
    assert len(src) == 6 and "circle/z_alias.jpg" not in ids and "circle/sub/again.png" not in ids
    assert "2 file(s) reached twice" in caplog.text


def test_one_file_in_two_classes_is_refused(tmp_path):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    os.symlink("../circle/circle_00.jpg", root / "square" / "odd.jpg")
    with pytest.raises(InputError, match=r"'circle/circle_00.jpg' and 'square/odd.jpg'.*same file"):
        resolve_source(str(root))


def test_one_file_in_two_split_folders_is_refused(tmp_path):
    root = make_split_folder(tmp_path / "d", per_class=2)
    os.symlink("../../train/circle/00.png", root / "test" / "circle" / "leak.png")
    with pytest.raises(InputError, match=r"test/circle/leak.png.*train/circle/00.png.*split"):
        resolve_source(str(root))


def _assert_justified_refusal(root: Path, message: str) -> None:
    """A refusal names two ids in two classes (every split is train here) that are one real
    file: the only reason a folder with symlinks may be refused."""
    found = re.search(
        r"'([^']+)' and '([^']+)' are the same file '([^']+)' under two classes", message
    )
    assert found, message
    a, b, real = found.groups()
    assert a.split("/")[0] != b.split("/")[0], message
    assert os.path.realpath(root / a) == os.path.realpath(root / b) == real, message


_TREE = ["a/x0.png", "a/s/x1.png", "b/y0.png", "b/t/u/y1.png", "c/z0.png"]
_DIRS = ["", "a", "a/s", "b", "b/t", "b/t/u", "c"]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    links=st.lists(
        st.tuples(st.sampled_from(_DIRS[1:]), st.sampled_from(_DIRS + _TREE)),
        min_size=1,
        max_size=5,
    )
)
def test_property_any_symlinks_each_file_once_and_in_one_split(tmp_path_factory, links):
    """Whatever symlinks a folder holds: each real file appears at most once (so in one split),
    every real file is found, or the source is refused naming the file reached twice."""
    root = touch_images(tmp_path_factory.mktemp("tree"), _TREE)
    for k, (where, target) in enumerate(links):
        link = root / where / f"L{k}" if not target.endswith(".png") else root / where / f"L{k}.png"
        os.symlink(os.path.relpath(root / target, link.parent), link)
    try:
        src = resolve_source(str(root), val_fraction=0.0, test_fraction=0.0)
    except InputError as e:
        _assert_justified_refusal(root, str(e))
        return
    real = _real_files(src)
    assert len(set(real)) == len(real)
    assert set(real) == {os.path.realpath(root / f) for f in _TREE}


# --------------------------------------------------------------------------- CSV


def test_csv_listing_one_file_under_two_names_is_refused(tmp_path):
    make_csv_manifest(tmp_path)
    os.symlink("circle-0.png", tmp_path / "img" / "alias.png")
    (tmp_path / "m.csv").write_text(
        "path,label\nimg/circle-0.png,a\nimg/circle-1.png,a\nimg/alias.png,b\n"
    )
    with pytest.raises(InputError, match=r"lines 2 and 4 .*same file.*more than once"):
        resolve_source(str(tmp_path / "m.csv"))


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"path,label\n\xff\xfeimg/circle-0.png,a\n", r"line 2.*not UTF-8.*save it as UTF-8"),
        (b"path,label\nimg/circle-0.png,\xe9t\xe9\n", r"line 2.*not UTF-8"),
        (b'path,label\n"' + b"x" * 200_000 + b'",a\n', r"line 2.*cannot be parsed"),
    ],
)
def test_csv_bad_bytes_are_an_input_error(tmp_path, payload, needle):
    make_csv_manifest(tmp_path)
    (tmp_path / "bad.csv").write_bytes(payload)
    with pytest.raises(InputError, match=needle):
        resolve_source(str(tmp_path / "bad.csv"))


def test_csv_paths_outside_its_folder_are_refused(tmp_path):
    data = tmp_path / "data"
    make_csv_manifest(data)
    save_as(draw_shape("circle"), tmp_path / "other" / "far.png", "RGB")
    far = tmp_path / "other" / "far.png"
    for n, row in ((3, "../other/far.png"), (3, str(far))):
        (data / "m.csv").write_text(f"path,label\nimg/circle-0.png,a\n{row},b\n")
        with pytest.raises(
            InputError, match=rf"line {n}: path '{row}' is outside.*--allow-outside-paths"
        ):
            resolve_source(str(data / "m.csv"))


def test_allowed_outside_paths_get_unambiguous_relative_ids(tmp_path):
    data = tmp_path / "data"
    make_csv_manifest(data)
    for d in ("o1", "o2"):
        save_as(draw_shape("circle", seed=len(d)), tmp_path / d / "same.png", "RGB")
    text = "path,label\nimg/circle-0.png,a\nimg/circle-1.png,a\n../o1/same.png,b\n"
    (data / "m.csv").write_text(text + f"{tmp_path / 'o2' / 'same.png'},b\n")
    src = resolve_source(str(data / "m.csv"), allow_outside_paths=True)
    ids = sorted(r.id for r in src.records)
    assert ids == ["data/img/circle-0.png", "data/img/circle-1.png", "o1/same.png", "o2/same.png"]
    assert src.root == str(tmp_path.resolve()) and src.outside_paths
    assert all(not os.path.isabs(i) and ".." not in i.split("/") for i in ids)
    for i in range(len(src)):
        assert src.load(i).size == (48, 40)


def test_inside_paths_keep_their_ids_with_the_flag(csv_manifest):
    plain = resolve_source(str(csv_manifest))
    flagged = resolve_source(str(csv_manifest), allow_outside_paths=True)
    assert flagged == plain and not flagged.outside_paths
    assert plain.root == str(csv_manifest.parent.resolve())


# --------------------------------------------------------------------------- GIF


def test_animated_gif_is_listed_and_decodes_its_first_frame(tmp_path):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    write_animated_gif(root / "circle" / "anim.gif", [(250, 10, 10), (10, 250, 10)])
    src = resolve_source(str(root))
    ids = [r.id for r in src.records]
    assert "circle/anim.gif" in ids
    img = src.load(ids.index("circle/anim.gif"))
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (250, 10, 10)


# --------------------------------------------------------------------------- fingerprints


def _same_size_edit_keeping_mtime(f: Path) -> None:
    st_ = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert f.stat().st_size == st_.st_size


def test_content_fingerprint_sees_a_same_size_edit_that_stat_misses(tmp_path):
    root = make_shapes_folder(tmp_path / "fp", per_class=3, odd=False, corrupt=False)
    src = resolve_source(str(root))
    stat0, content0 = src.fingerprint("stat"), src.fingerprint("content")
    assert src.fingerprint() == stat0 != content0 and len(content0) == 64
    _same_size_edit_keeping_mtime(root / src.records[0].id)
    assert src.fingerprint("stat") == stat0  # the documented blind spot of the default
    assert src.fingerprint("content") != content0
    with pytest.raises(InputError, match="stat, content"):
        src.fingerprint("mtime")


def test_content_fingerprint_ignores_mtime_and_is_parallel_safe(tmp_path):
    root = make_shapes_folder(tmp_path / "fp", per_class=4, odd=False, corrupt=False)
    src = resolve_source(str(root))
    a = src.fingerprint("content", workers=1)
    assert src.fingerprint("content", workers=4) == a
    f = root / src.records[-1].id
    os.utime(f, ns=(1, 10**18))
    assert src.fingerprint("content") == a


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    content=st.binary(min_size=1, max_size=3000),
    where=st.integers(min_value=0),
    flip=st.integers(min_value=1, max_value=255),
)
def test_property_content_fingerprint_sees_any_byte(tmp_path_factory, content, where, flip):
    """Change any one byte of one file, keeping its size and mtime: the content fingerprint
    changes (the stat one cannot see it)."""
    root = touch_images(tmp_path_factory.mktemp("bytes"), ["a/x.png", "a/y.png", "b/z.png"])
    victim = root / "a" / "y.png"
    victim.write_bytes(content)
    src = resolve_source(str(root), val_fraction=0.0, test_fraction=0.0)
    before_stat, before = src.fingerprint("stat"), src.fingerprint("content", workers=2)
    data = bytearray(content)
    data[where % len(data)] ^= flip
    st_ = victim.stat()
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert src.fingerprint("stat") == before_stat
    assert src.fingerprint("content", workers=2) != before


def test_cub_paths_outside_images_and_bad_bytes(tmp_path, cub_root):
    import shutil

    root = tmp_path / "cub"
    shutil.copytree(cub_root, root)
    save_as(draw_shape("circle"), tmp_path / "far.jpg", "RGB")
    for name, line in [
        ("images.txt", "13 ../../far.jpg"),
        ("image_class_labels.txt", "13 1"),
        ("train_test_split.txt", "13 1"),
    ]:
        with (root / name).open("a") as f:
            f.write(line + "\n")
    with pytest.raises(InputError, match=r"image id 13: path '../../far.jpg' is outside"):
        resolve_source(str(root))
    src = resolve_source(str(root), allow_outside_paths=True)
    assert src.outside_paths and src.root == str(tmp_path.resolve())
    assert "far.jpg" in [r.id for r in src.records] and "cub/images/" in src.records[0].id
    (root / "classes.txt").write_bytes(b"1 Circle\n2 Squ\xe4re\n3 Tri\n")
    with pytest.raises(InputError, match=r"classes.txt of .* line 2 is not UTF-8"):
        resolve_source(str(root), allow_outside_paths=True)


@pytest.mark.timeout(30)
def test_a_fifo_in_a_class_folder_neither_blocks_hashing_nor_loading(tmp_path):
    root = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    os.mkfifo(root / "circle" / "pipe.png")
    src = resolve_source(str(root))
    assert len(src.fingerprint("content")) == 64
    i = [r.id for r in src.records].index("circle/pipe.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        src.load(i)


def test_stat_fingerprint_format_is_unchanged(tmp_path):
    """Keys of existing stores must not move: recompute the v1 stat formula independently."""
    import hashlib

    root = make_shapes_folder(tmp_path / "fp", per_class=2, odd=False, corrupt=False)
    src = resolve_source(str(root))
    h = hashlib.sha256()

    def feed(*parts):
        for p in parts:
            h.update(str(p).encode())
            h.update(b"\x1f")
        h.update(b"\x1e")

    feed("carrot-source-v1", "folder", *SHAPES)
    feed(0.1, 0.2, 0)
    for r in src.records:
        st_ = os.stat(root / r.id)
        feed(r.id, st_.st_size, st_.st_mtime_ns)
        feed(r.label, r.split)
    assert src.fingerprint() == h.hexdigest()
