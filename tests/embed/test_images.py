"""load_rgb: every Pillow mode → 8-bit RGB, EXIF orientation, unreadable files → ImageLoadError."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from image_factory import ODD_FILES, draw_shape, save_as, write_animated_gif, write_corrupt_jpeg
from PIL import Image

from pipeline.embed.images import ImageLoadError, is_image_file, load_rgb, to_rgb

W, H = 12, 8


def _check_rgb(img: Image.Image, size=(W, H)) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    a = np.asarray(img)
    assert a.dtype == np.uint8 and a.shape == (size[1], size[0], 3)
    return a


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("1", ".png"),
        ("L", ".png"),
        ("LA", ".png"),
        ("P", ".png"),
        ("RGB", ".jpg"),
        ("RGBA", ".png"),
        ("CMYK", ".jpg"),
        ("I;16", ".png"),
        ("I", ".tif"),
        ("F", ".tif"),
        ("RGB", ".webp"),
        ("L", ".bmp"),
    ],
)
def test_every_mode_becomes_rgb_uint8(tmp_path, mode, suffix):
    path = tmp_path / f"img{suffix}"
    save_as(draw_shape("circle", size=(W, H)), path, mode)
    _check_rgb(load_rgb(path))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # → 0, 1, 128, 255
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    a = np.asarray(load_rgb(path))
    assert a[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_int32_and_float_modes_are_scaled():
    i16_range = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(i16_range))[0, :, 0].tolist() == [0, 255]
    i8_range = Image.fromarray(np.array([[0, 200]], dtype=np.int32), mode="I")
    assert np.asarray(to_rgb(i8_range))[0, :, 0].tolist() == [0, 200]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], dtype=np.float32), mode="F")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red-ish
    rgba[:, : W // 2, 3] = 0  # left half fully transparent
    rgba[:, W // 2 :, 3] = 255  # right half opaque
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    a = _check_rgb(load_rgb(path))
    assert (a[:, : W // 2] == 255).all()
    assert (a[:, W // 2 :] == [200, 0, 0]).all()


def test_palette_transparency_is_white(tmp_path):
    p = Image.new("P", (W, H), 0)
    p.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    p.paste(1, (0, 0, W // 2, H))
    path = tmp_path / "pal.png"
    p.save(path, transparency=0)
    a = _check_rgb(load_rgb(path))
    assert (a[:, W // 2 :] == 255).all()  # index 0 is transparent
    assert (a[:, : W // 2] == [200, 100, 50]).all()


def test_cmyk_jpeg_colours(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(path, quality=95)  # pure red
    a = _check_rgb(load_rgb(path)).astype(int)
    assert np.abs(a - [255, 0, 0]).max() <= 8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (W, H), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 2, 2))  # white mark at the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = _check_rgb(load_rgb(path), size=(H, W))  # width and height swapped
    assert out[0, -1].mean() > 200  # the mark moved to the top-right corner
    assert out[0, 0].mean() < 50


def test_truncated_jpeg_raises_with_id(tmp_path):
    path = tmp_path / "cut.jpg"
    write_corrupt_jpeg(path)
    with pytest.raises(ImageLoadError) as err:
        load_rgb(path, image_id="cls/cut.jpg")
    assert err.value.image_id == "cls/cut.jpg"
    assert "cls/cut.jpg" in str(err.value)
    assert "truncated" in err.value.reason


@pytest.mark.parametrize(
    "payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20]
)
def test_garbage_and_missing_files_raise(tmp_path, payload):
    path = tmp_path / "bad.png"
    path.write_bytes(payload)
    with pytest.raises(ImageLoadError):
        load_rgb(path)
    with pytest.raises(ImageLoadError, match="not found"):
        load_rgb(tmp_path / "absent.png")


def test_image_load_error_pickles():
    e = pickle.loads(pickle.dumps(ImageLoadError("a/b.jpg", "broken")))
    assert (e.image_id, e.reason) == ("a/b.jpg", "broken")


def test_extensions_case_insensitive():
    assert is_image_file("a/B.JPG") and is_image_file("x.Png") and is_image_file("y.webp")
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


def test_gif_is_an_image_and_an_animation_gives_its_first_frame(tmp_path):
    assert is_image_file("a/b.gif") and is_image_file("c.GIF")
    write_animated_gif(tmp_path / "a.gif", [(0, 0, 255), (255, 0, 0), (0, 255, 0)], size=(W, H))
    a = _check_rgb(load_rgb(tmp_path / "a.gif"))
    assert (a == (0, 0, 255)).all()
    still = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # transparent single-frame GIF → white
    still.save(tmp_path / "t.gif")
    assert (_check_rgb(load_rgb(tmp_path / "t.gif")) == 255).all()


@pytest.mark.timeout(30)
def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    with pytest.raises(ImageLoadError, match="not a regular file") as err:
        load_rgb(tmp_path / "pipe.png", image_id="cls/pipe.png")
    assert err.value.image_id == "cls/pipe.png"


def test_odd_files_of_the_factory_load(shapes_folder):
    for rel in ODD_FILES:
        _check_rgb(load_rgb(shapes_folder / rel), size=(48, 40))


@settings(deadline=None, max_examples=40)
@given(arrays(np.uint16, st.tuples(st.integers(1, 6), st.integers(1, 6))))
def test_property_16bit_round_trip(values):
    """Any 16-bit gray PNG decodes to round(v / 257) in all three channels."""
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    buf.seek(0)
    a = np.asarray(to_rgb(Image.open(buf)))
    expect = np.rint(values / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], expect)


@settings(deadline=None, max_examples=40)
@given(arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 5), st.just(4))))
def test_property_alpha_composite_matches_formula(rgba):
    """RGBA → RGB equals c·a + 255·(1 − a) within rounding."""
    out = np.asarray(to_rgb(Image.fromarray(rgba, mode="RGBA"))).astype(float)
    a = rgba[..., 3:4] / 255.0
    expect = rgba[..., :3] * a + 255.0 * (1 - a)
    assert np.abs(out - expect).max() <= 1.0
