"""timm's training views, drawn from a private RNG per view.

timm's train transform (random resized crop, flips, colour jitter) draws from Python's global
``random`` and torch's global generator. Seeding those around each view
(:func:`pipeline.embed.seeding.seeded_global_rngs`) is deterministic only while no other thread
of the process draws from them in between — and a Dask scheduler, Prefect's client or tornado's
timers in the same process do (``random.random()`` for jitter, ``random.sample`` for workers).

:class:`SeededView` runs the same transform steps — timm's own objects, with their sizes, scales,
ratios, interpolations and jitter strengths — but feeds each random step from a
``random.Random(seed)`` and a ``torch.Generator`` seeded with ``seed``, which no other thread can
reach. It draws the same numbers in the same order as the global-seeded call, so its views are
bit-identical to those of stores written before it. A transform with a step it does not know
runs whole under the seeded global RNGs, as before (:attr:`SeededView.private` says which).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image
from timm.data import transforms as timm_tf

from pipeline.embed.seeding import seeded_global_rngs

Step = Callable[[Any, random.Random, torch.Generator], Any]  # (image, py rng, torch rng) → image

# Steps that draw nothing: called as they are. (timm's ResizeKeepRatio is not among them: with
# random_scale_prob, random_aspect_prob or a "random" interpolation it draws from `random`.)
_DETERMINISTIC = (
    timm_tf.ToNumpy,
    timm_tf.ToTensor,
    timm_tf.MaybeToTensor,
    timm_tf.MaybePILToTensor,
    timm_tf.CenterCropOrPad,
    timm_tf.TrimBorder,
    T.ToTensor,
    T.PILToTensor,
    T.Normalize,
    T.Resize,
    T.CenterCrop,
    T.ConvertImageDtype,
)


def _crop_params(
    img: Any, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` with ``rng`` for ``random``:
    (top, left, height, width) of the crop, in pixels."""
    img_w, img_h = F.get_image_size(img)
    area = img_w * img_h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        target_w = round(math.sqrt(target_area * aspect_ratio))
        target_h = round(math.sqrt(target_area / aspect_ratio))
        if target_w <= img_w and target_h <= img_h:
            i = rng.randint(0, img_h - target_h)
            j = rng.randint(0, img_w - target_w)
            return i, j, target_h, target_w
    in_ratio = img_w / img_h  # fallback: a central crop, as timm's
    if in_ratio < min(ratio):
        target_w, target_h = img_w, round(img_w / min(ratio))
    elif in_ratio > max(ratio):
        target_w, target_h = round(img_h * max(ratio)), img_h
    else:
        target_w, target_h = img_w, img_h
    return (img_h - target_h) // 2, (img_w - target_w) // 2, target_h, target_w


def _random_resized_crop(t: timm_tf.RandomResizedCropAndInterpolation) -> Step:
    def step(img: Any, rng: random.Random, _gen: torch.Generator) -> Any:
        i, j, h, w = _crop_params(img, t.scale, t.ratio, rng)
        interp = t.interpolation
        if isinstance(interp, (tuple, list)):
            interp = rng.choice(interp)
        return F.resized_crop(img, i, j, h, w, t.size, interp)

    return step


def _flip(p: float, flip: Callable[[Any], Any]) -> Step:
    def step(img: Any, _rng: random.Random, gen: torch.Generator) -> Any:
        return flip(img) if torch.rand(1, generator=gen) < p else img

    return step


def _color_jitter(t: T.ColorJitter) -> Step:
    """torchvision's ``ColorJitter.forward`` with ``gen`` for torch's global generator."""
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    ranges = (t.brightness, t.contrast, t.saturation, t.hue)

    def step(img: Any, _rng: random.Random, gen: torch.Generator) -> Any:
        order = torch.randperm(4, generator=gen)
        factors = [
            None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=gen))
            for r in ranges
        ]
        for k in order.tolist():
            if factors[k] is not None:
                img = adjust[k](img, factors[k])
        return img

    return step


def _step(t: Any) -> Step | None:
    """The private-RNG form of one transform step, or None when it is not known."""
    if isinstance(t, timm_tf.RandomResizedCropAndInterpolation):
        return _random_resized_crop(t)
    if type(t) is T.RandomHorizontalFlip:
        return _flip(float(t.p), F.hflip)
    if type(t) is T.RandomVerticalFlip:
        return _flip(float(t.p), F.vflip)
    if type(t) is T.ColorJitter:
        return _color_jitter(t)
    if type(t) in _DETERMINISTIC:
        return lambda img, _rng, _gen: t(img)
    return None


class SeededView:
    """``view(img, seed)``: ``transform(img)`` with every random draw taken from RNGs seeded by
    ``seed`` (≥ 0) — private ones where each step is known, the process-global ones under their
    lock otherwise. The caller's global RNG states are never touched on the private path."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform
        parts = transform.transforms if isinstance(transform, T.Compose) else [transform]
        steps = [_step(t) for t in parts]
        self.steps: list[Step] | None = None if any(s is None for s in steps) else steps  # type: ignore[assignment]

    @property
    def private(self) -> bool:
        """True when no step draws from a process-global RNG."""
        return self.steps is not None

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        if self.steps is None:
            with seeded_global_rngs(seed):
                return self.transform(img)
        rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
        out: Any = img
        for step in self.steps:
            out = step(out, rng, gen)
        return out
