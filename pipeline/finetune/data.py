"""Images for fine-tuning: a split of an `ImageSource` through timm's transforms.

The training transform (timm's ``create_transform(is_training=True)``: random resized crop, flip,
colour jitter) draws from seeded RNGs: image ``i`` in epoch ``e`` always gets the same crop, and
the epoch's order is a permutation seeded by ``(seed, e)``. So a resumed run sees exactly the
batches the uninterrupted one would have, whatever the number of decode workers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.embed.extract import derived_seed, resolve_num_workers
from pipeline.embed.images import ImageLoadError
from pipeline.embed.sources import ImageSource
from pipeline.embed.views import SeededView

Transform = Callable[[Image.Image], torch.Tensor]


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """The seed of what epoch ``epoch`` draws (``more``: which draw, which image)."""
    return derived_seed(seed, epoch, *more)


class SplitImages(Dataset):
    """Item k → (pixels (3, H, W) float32, label, ok) for record ``rows[k]`` of ``source``.

    ``seeded``: the transform runs with RNGs seeded by ``(seed, epoch, row)`` (`set_epoch`).
    An unreadable image gives ok False and zeros, so that one bad file does not end a run; the
    loop drops such rows and counts them."""

    def __init__(
        self,
        source: ImageSource,
        rows: np.ndarray,
        transform: Transform,
        input_size: tuple[int, int, int],
        *,
        seed: int | None = None,
    ) -> None:
        self.source, self.rows, self.transform = source, [int(r) for r in rows], transform
        self.labels = source.labels[np.asarray(rows, dtype=np.int64)]
        self.input_size, self.seed, self.epoch = input_size, seed, 0
        self.view = SeededView(transform)  # its draws from RNGs of its own, seeded per item

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, bool]:
        row = self.rows[k]
        try:
            img = self.source.load(row)
        except ImageLoadError:
            return torch.zeros(self.input_size), int(self.labels[k]), False
        if self.seed is None:
            return self.transform(img), int(self.labels[k]), True
        seed = epoch_seed(self.seed, self.epoch, row)
        return self.view(img, seed), int(self.labels[k]), True


class EpochOrder(torch.utils.data.Sampler[int]):
    """A permutation of ``n`` items per epoch, seeded by ``(seed, epoch)``; starting at item
    ``start`` (a resumed epoch skips what it has done)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=generator)

    def __iter__(self):
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def loader(
    dataset: SplitImages,
    *,
    batch_size: int,
    workers: int | str,
    sampler: torch.utils.data.Sampler | None = None,
    pin: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` (in order unless ``sampler``), ``workers`` resolved as
    for stage 1."""
    from pipeline.embed.extract import die_with_parent

    n = resolve_num_workers(workers, n_images=len(dataset), batch_size=batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=n,
        pin_memory=pin,
        worker_init_fn=die_with_parent if n else None,
        persistent_workers=False,
    )
