"""The stage-1 extraction loop: decode + transform in DataLoader workers, forward in batches.

``extract_rows(backbone, source, rows, cfg)`` embeds the given rows of a source. It is
deterministic: the same rows give the same features whatever ran before, so a resumed chunk
equals an uninterrupted one (augmented views are seeded per (view_seed, row, view)).
Workers send uint8 pixels; the backbone normalizes on its device. Unreadable images are skipped
(``valid`` False, reason in ``errors``) or, with ``strict``, raise :class:`InputError`.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.embed.backbone import Backbone
from pipeline.embed.images import ImageLoadError
from pipeline.embed.sources import ImageSource
from pipeline.embed.views import SeededView
from pipeline.errors import InputError
from pipeline.terminal import printable

__all__ = [
    "ChunkResult",
    "ExtractConfig",
    "NonFiniteFeaturesError",
    "extract_rows",
    "resolve_num_workers",
    "view_seed_for",
]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


@dataclass(frozen=True)
class ExtractConfig:
    """How to run the extraction loop."""

    batch_size: int = 64  # images per forward (backs off on CUDA out-of-memory)
    num_workers: int | str = (
        "auto"  # decode workers: int, or "auto" = min(4, cpus-1), 0 on tiny jobs
    )
    views: int = 0  # augmented views per image (timm training transform), on top of the clean one
    view_seed: int = 0  # seed of the augmented views
    strict: bool = False  # an unreadable image is an error instead of being skipped

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size!r} must be a positive integer, e.g. 64")
        if not (
            self.num_workers == "auto"
            or (isinstance(self.num_workers, int) and self.num_workers >= 0)
        ):
            raise InputError(f"num_workers={self.num_workers!r} must be 'auto' or an integer >= 0")
        if not isinstance(self.views, int) or self.views < 0:
            raise InputError(f"views={self.views!r} must be an integer >= 0")
        if not isinstance(self.view_seed, int) or self.view_seed < 0:
            raise InputError(f"view_seed={self.view_seed!r} must be an integer >= 0")


@dataclass
class ChunkResult:
    """Embeddings of a range of rows."""

    features: np.ndarray  # (n, D) float32, or (n, 1+V, D) when views > 0 (index 0 = clean view)
    valid: np.ndarray  # (n,) bool — False for skipped (unreadable) images, whose features are 0
    errors: list[str]  # (n,) "" or the reason the image was skipped
    seconds: float  # wall time of the call


class NonFiniteFeaturesError(ValueError):
    """The backbone produced NaN/Inf features; ``ids`` names the images, ``precision`` the
    resolved forward precision (fp32 | bf16 | fp16)."""

    def __init__(self, ids: Sequence[str], precision: str = "fp32") -> None:
        self.ids = list(ids)
        self.precision = precision
        if precision == "fp32":
            cause = "the backbone's weights are broken (check the --checkpoint file)"
        else:
            cause = (
                f"the {precision} autocast overflowed or the weights are broken (fp32 runs "
                "with --device cpu, or BackboneConfig(precision='fp32') in Python)"
            )
        super().__init__(
            f"non-finite (NaN/Inf) features for {len(self.ids)} image(s), e.g. "
            f"{self.ids[:5]}, with the backbone in {precision}: {cause}"
        )

    def __reduce__(self):
        return (type(self), (self.ids, self.precision))


def extract_rows(
    backbone: Backbone,
    source: ImageSource,
    rows: Sequence[int],
    cfg: ExtractConfig,
    *,
    forward: ForwardFn | None = None,
    row_offset: int = 0,
) -> ChunkResult:
    """Embed ``source`` rows ``rows`` (e.g. one store chunk's ``range``).

    Args:
        backbone: the frozen backbone (gives transforms, device, D).
        source: the image source.
        rows: row indices into ``source.records``, in output order.
        cfg: batch size, workers, views, strictness.
        forward: override of ``backbone.forward`` ((B, 3, H, W) uint8 → (B, D)); for tests and
            instrumentation.
        row_offset: where ``source`` starts in the full data set (a worker's slice of it), so
            augmented views are seeded by the full set's row numbers, as in a single process.

    Raises:
        InputError: ``cfg.strict`` and an image is unreadable (names it and ``--strict``).
        NonFiniteFeaturesError: NaN/Inf features (names the images).
    """
    t0 = time.perf_counter()
    forward = forward or backbone.forward
    n, n_views = len(rows), 1 + cfg.views
    dim = backbone.dim
    features = np.zeros((n, n_views, dim), dtype=np.float32)  # (n, 1+V, D)
    valid = np.zeros(n, dtype=bool)
    errors = [""] * n
    workers = resolve_num_workers(cfg.num_workers, n_images=n, batch_size=cfg.batch_size)
    dataset = _RowDataset(
        source,
        list(rows),
        clean=backbone.transform(train=False, normalize=False),
        augment=SeededView(backbone.transform(train=True, normalize=False)) if cfg.views else None,
        views=cfg.views,
        view_seed=cfg.view_seed,
        input_size=backbone.input_size,
        row_offset=row_offset,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=backbone.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),  # leave the global torch RNG alone
        worker_init_fn=die_with_parent if workers else None,
    )
    micro = [cfg.batch_size * n_views]  # forward batch size (rows × views); shrinks on OOM
    start = 0
    for x, ok, err in loader:  # x: (b, 1+V, 3, H, W) uint8; ok: (b,) bool; err: b × str
        b = len(err)
        ok_np = ok.numpy().astype(bool)
        if not ok_np.all():
            bad = [k for k in range(b) if not ok_np[k]]
            first = source.records[rows[start + bad[0]]].id
            if cfg.strict:
                raise InputError(
                    f"unreadable image {first!r}: {printable(err[bad[0]])} (--strict stops at the first "
                    "unreadable image; drop --strict to skip such images)"
                )
            for k in bad:
                logger.warning(
                    "skipping unreadable image %r: %s", source.records[rows[start + k]].id, err[k]
                )
                errors[start + k] = err[k]
            x = x[torch.from_numpy(ok_np)]
        if len(x):
            flat = x.flatten(0, 1)  # (b' (1+V), 3, H, W)
            y = _forward_with_backoff(forward, flat, micro).view(
                len(x), n_views, -1
            )  # (b', 1+V, D)
            finite = torch.isfinite(y).flatten(1).all(dim=1)
            if not bool(finite.all()):
                idx = np.flatnonzero(ok_np)[~finite.cpu().numpy()]
                raise NonFiniteFeaturesError(
                    [source.records[rows[start + k]].id for k in idx], backbone.precision
                )
            features[start : start + b][ok_np] = y.cpu().numpy()
            valid[start : start + b] = ok_np
        start += b
    out = features if cfg.views else features[:, 0]
    seconds = time.perf_counter() - t0
    logger.debug(
        "extracted %d rows in %.2f s (%d workers, %d skipped)", n, seconds, workers, n - valid.sum()
    )
    return ChunkResult(features=out, valid=valid, errors=errors, seconds=seconds)


def resolve_num_workers(num_workers: int | str, *, n_images: int, batch_size: int) -> int:
    """Decode workers: an int is kept; ``"auto"`` → ``min(4, cpus - 1)``, but 0 for jobs of at
    most two batches and inside daemonic processes (which cannot have children)."""
    if num_workers != "auto":
        return int(num_workers)
    if multiprocessing.current_process().daemon or n_images <= 2 * batch_size:
        return 0
    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(0, min(4, cpus - 1))


def derived_seed(*parts: int) -> int:
    """A 64-bit RNG seed derived from non-negative integers (NumPy's ``SeedSequence``)."""
    state = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def view_seed_for(view_seed: int, row: int, view: int) -> int:
    """The RNG seed of augmented view ``view`` (1-based) of source row ``row``."""
    return derived_seed(view_seed, row, view)


def _forward_with_backoff(forward: ForwardFn, x: torch.Tensor, micro: list[int]) -> torch.Tensor:
    """Forward ``x`` (N, 3, H, W) in slices of ``micro[0]`` rows; on out-of-memory halve
    ``micro[0]`` (kept for later batches) and retry the whole batch, down to 1. → (N, D)."""
    while True:
        size = micro[0]
        try:
            return torch.cat([forward(x[i : i + size]) for i in range(0, len(x), size)])
        except _OOM_ERRORS:
            if size <= 1:
                raise
            micro[0] = max(1, min(size, len(x)) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of memory at forward batch %d; retrying with %d", size, micro[0])


class _RowDataset(Dataset):
    """Item k → (pixels (1+V, 3, H, W) uint8, ok, error) for source row ``rows[k]``."""

    def __init__(
        self,
        source: ImageSource,
        rows: list[int],
        *,
        clean: Callable[[Image.Image], torch.Tensor],
        augment: SeededView | None,
        views: int,
        view_seed: int,
        input_size: tuple[int, int, int],
        row_offset: int = 0,
    ) -> None:
        self.source, self.rows, self.row_offset = source, rows, row_offset
        self.clean, self.augment = clean, augment
        self.views, self.view_seed = views, view_seed
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, bool, str]:
        row = self.rows[k]
        try:
            img = self.source.load(row)
        except ImageLoadError as e:
            return (
                torch.zeros((1 + self.views, *self.input_size), dtype=torch.uint8),
                False,
                e.reason,
            )
        out = [self.clean(img)]
        for v in range(1, 1 + self.views):
            out.append(self.augment(img, view_seed_for(self.view_seed, self.row_offset + row, v)))  # type: ignore[misc]
        return torch.stack(out), True, ""


def die_with_parent(_worker_id: int) -> None:
    """In a DataLoader worker: ask Linux to SIGKILL it when its parent dies. torch's own
    watchdog polls the parent every 5 s; a ``kill -9`` of ``carrot embed`` otherwise leaves
    workers for up to that long (measured: alive at 3 s, gone by 6 s; with this, 0.5 s)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
