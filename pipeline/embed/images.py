"""Decode any image file Pillow reads into an 8-bit RGB ``PIL.Image``.

Conversion rules (one place, so every source decodes alike):

- EXIF orientation is applied (``ImageOps.exif_transpose``).
- Alpha (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key) is composited on
  white.
- 16-bit integer modes (``I;16*``) are scaled to 8 bits (``round(v / 257)``), never clipped.
- ``I`` (32-bit int) holds 8-bit, 16-bit or arbitrary data: values within 0..255 are kept,
  within 0..65535 scaled by 1/257, anything else is min-max stretched to 0..255.
- ``F`` (32-bit float): values within 0..1 are scaled by 255, within 0..255 kept, anything else
  min-max stretched.
- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` use Pillow's own conversion.
- Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) give their first frame.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMG_EXTENSIONS", "ImageLoadError", "is_image_file", "load_rgb", "to_rgb"]

#: File extensions treated as images (torchvision's list plus ``.gif``; compared lower-case).
IMG_EXTENSIONS: tuple[str, ...] = (
    ".gif",
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

_WHITE = (255, 255, 255)


class ImageLoadError(Exception):
    """An image could not be read or decoded.

    Attributes:
        image_id: the source-relative id (or path) of the image.
        reason: a short description of what went wrong.
    """

    def __init__(self, image_id: str, reason: str) -> None:
        super().__init__(f"cannot read image {image_id!r}: {reason}")
        self.image_id = image_id
        self.reason = reason

    def __reduce__(self):  # keep picklable across DataLoader / Dask workers
        return (type(self), (self.image_id, self.reason))


def is_image_file(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def load_rgb(path: str | os.PathLike[str], *, image_id: str | None = None) -> Image.Image:
    """Read ``path`` fully and return it as an 8-bit RGB image (H, W same as the file).

    Raises:
        ImageLoadError: missing, unreadable, truncated or corrupt file, or not a regular file
            (``image_id`` defaults to the path).
    """
    image_id = str(path) if image_id is None else image_id
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader forever
            raise ImageLoadError(image_id, "not a regular file (a FIFO, socket or device)")
        with warnings.catch_warnings():
            # A truncated or oversized file must become an error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)  # animations and multi-page files: the first frame
                img.load()  # decode now: truncated/corrupt data fails here, inside the try
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except FileNotFoundError:
        raise ImageLoadError(image_id, "file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(image_id, f"{type(e).__name__}: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageLoadError(image_id, f"image too large: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (see the module doc for rules)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _composite_on_white(img)
    return img.convert("RGB")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Alpha-composite on a white background; returns RGB."""
    if img.mode == "RGBa" or img.mode == "La":  # premultiplied alpha
        img = img.convert("RGBA" if img.mode == "RGBa" else "LA")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit int / float single-channel images to 8-bit gray RGB."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a8 = _scale(a.astype(np.float64), 65535.0)
    else:
        a = a.astype(np.float64)
        finite = np.isfinite(a)
        lo = float(a[finite].min()) if finite.any() else 0.0
        hi = float(a[finite].max()) if finite.any() else 0.0
        a = np.where(finite, a, lo)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            a8 = _scale(a, 1.0)
        elif lo >= 0.0 and hi <= 255.0:
            a8 = np.rint(a).astype(np.uint8)
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            a8 = _scale(a, 65535.0)
        else:
            span = hi - lo if hi > lo else 1.0
            a8 = _scale(a - lo, span)
    return Image.fromarray(a8).convert("RGB")  # (H, W) uint8 → mode L


def _scale(a: np.ndarray, full_scale: float) -> np.ndarray:
    """Map ``0..full_scale`` linearly onto ``0..255`` uint8 (rounded, clipped at the ends)."""
    return np.clip(np.rint(a * (255.0 / full_scale)), 0, 255).astype(np.uint8)
