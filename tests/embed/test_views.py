"""Training views from private RNGs (pipeline.embed.views): the same views as timm's transform
under seeded global RNGs, bit for bit, and unmoved by other threads drawing from those RNGs."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import timm.data
import torch
import torchvision.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from timm.data import transforms as timm_tf

from pipeline.embed.seeding import seeded_global_rngs
from pipeline.embed.views import SeededView

# timm train transforms as stage 1 and fine-tuning build them, and with every random step on.
TRANSFORMS = {
    "uint8 (stage 1)": dict(input_size=(3, 40, 40), is_training=True, use_prefetcher=True),
    "float (fine-tune)": dict(input_size=(3, 40, 40), is_training=True, interpolation="bicubic"),
    "random interpolation, vflip, hue": dict(
        input_size=(3, 24, 32),
        is_training=True,
        interpolation="random",
        vflip=0.5,
        color_jitter=(0.4, 0.3, 0.2, 0.1),
    ),
    "narrow crop ratio (central fallback)": dict(
        input_size=(3, 16, 16), is_training=True, scale=(0.9, 1.0), ratio=(3.0, 4.0)
    ),
}


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def global_seeded(transform, img: Image.Image, seed: int) -> torch.Tensor:
    """How the views were drawn before: the transform under seeded global RNGs."""
    with seeded_global_rngs(seed):
        return transform(img)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_timm_train_transforms_run_on_private_rngs(name):
    assert SeededView(timm.data.create_transform(**TRANSFORMS[name])).private


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(TRANSFORMS)),
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(8, 64),
    w=st.integers(8, 64),
)
def test_private_views_equal_global_seeded_ones_bit_for_bit(name, seed, h, w):
    transform = timm.data.create_transform(**TRANSFORMS[name])
    img = image(h, w, seed % 1000)
    assert torch.equal(SeededView(transform)(img, seed), global_seeded(transform, img, seed))


def test_views_differ_by_seed():
    view = SeededView(timm.data.create_transform(**TRANSFORMS["uint8 (stage 1)"]))
    img = image(48, 48)
    assert not torch.equal(view(img, 0), view(img, 1))


def test_views_are_unmoved_by_other_threads_drawing_from_the_global_rngs():
    """The Dask scheduler, Prefect's client and tornado's timers draw from Python's ``random`` in
    this process; a view's crop and flip must not depend on when they do."""
    view = SeededView(timm.data.create_transform(**TRANSFORMS["float (fine-tune)"]))
    img, seeds = image(48, 48), list(range(40))
    quiet = {s: view(img, s) for s in seeds}
    stop = threading.Event()

    def draw_forever() -> None:
        while not stop.is_set():
            random.random()
            torch.rand(1)

    noisy = [threading.Thread(target=draw_forever) for _ in range(2)]
    for t in noisy:
        t.start()
    try:
        busy = {s: view(img, s) for s in seeds for _ in range(3)}
    finally:
        stop.set()
        for t in noisy:
            t.join()
    assert all(torch.equal(busy[s], quiet[s]) for s in seeds)


def test_a_private_view_leaves_the_global_rngs_alone():
    view = SeededView(timm.data.create_transform(**TRANSFORMS["uint8 (stage 1)"]))
    random.seed(3)
    torch.manual_seed(3)
    expected = (random.random(), torch.rand(2).tolist())
    random.seed(3)
    torch.manual_seed(3)
    view(image(32, 32), 11)
    assert (random.random(), torch.rand(2).tolist()) == expected


@pytest.mark.parametrize(
    "step",
    [
        T.RandomRotation(30),
        timm_tf.ResizeKeepRatio(24, random_scale_prob=0.5, random_aspect_prob=0.5),
    ],
    ids=["RandomRotation", "ResizeKeepRatio with random scale"],
)
def test_a_transform_with_an_unknown_step_falls_back_to_the_seeded_global_rngs(step):
    transform = T.Compose([step, T.PILToTensor()])
    view, img = SeededView(transform), image(32, 32)
    assert not view.private
    assert torch.equal(view(img, 5), global_seeded(transform, img, 5))
    assert torch.equal(view(img, 5), view(img, 5))
