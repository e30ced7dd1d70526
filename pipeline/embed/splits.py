"""Seeded, stratified train/val/test splits for sources that do not give all three.

Rules (shared by every source kind):

- A source that gives no split at all: ``test_fraction`` of all images goes to ``test`` and
  ``val_fraction`` of all images to ``val``; the rest is ``train``.
- A source that gives some splits: each missing split among ``val`` / ``test`` is carved from
  ``train`` (``val_fraction`` / ``test_fraction`` of the train images).
- Carving is stratified by label (scikit-learn ``train_test_split``). Fallback, logged: images
  of classes with fewer than 2 images in the pool stay in ``train``; if stratifying the rest is
  still impossible (fewer held-out images than classes), the split is random (seeded) instead.
  Either way every class keeps at least one image in the pool it is carved from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.errors import InputError

__all__ = ["SPLITS", "assign_splits", "carve", "check_fractions"]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise InputError unless both fractions are in [0, 1) and their sum is below 1."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(f, int | float) and 0.0 <= f < 1.0):
            raise InputError(f"{name}={f!r} is not a fraction in [0, 1); pass e.g. 0.1")
    if val_fraction + test_fraction >= 1.0:
        raise InputError(
            f"--val-fraction + --test-fraction = {val_fraction + test_fraction:g} leaves no "
            "training images; make their sum smaller than 1"
        )


def assign_splits(
    labels: Sequence[int],
    given: Sequence[str | None] | None,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """Complete the split of every image.

    Args:
        labels: (N,) class index per image.
        given: (N,) split per image from the source ("train" | "val" | "test"), or None when the
            source gives no split. A partial assignment is not accepted: all or none.
        val_fraction, test_fraction: see the module doc.
        seed: seed for the carving; same inputs and seed give the same splits.

    Returns:
        (N,) list of "train" | "val" | "test".
    """
    check_fractions(val_fraction, test_fraction)
    labels_arr = np.asarray(labels, dtype=np.int64)
    n = len(labels_arr)
    if given is None:
        splits = np.full(n, "train", dtype=object)
        pool = np.arange(n)
        test_idx = carve(labels_arr, pool, test_fraction, seed=seed)
        splits[test_idx] = "test"
        rest = pool[splits[pool] == "train"]
        # val is a fraction of all images: rescale to the remaining pool.
        val_of_rest = val_fraction / (1.0 - test_fraction) if test_fraction < 1.0 else 0.0
        val_idx = carve(labels_arr, rest, val_of_rest, seed=seed + 1)
        splits[val_idx] = "val"
        return list(splits)

    splits = np.asarray(list(given), dtype=object)
    if len(splits) != n:
        raise ValueError(f"given has {len(splits)} entries for {n} labels")
    present = set(splits.tolist())
    unknown = present - set(SPLITS)
    if unknown:
        raise InputError(
            f"unknown split name(s) {sorted(map(str, unknown))}; use train, val or test"
        )
    train = np.flatnonzero(splits == "train")
    if "test" not in present and test_fraction > 0:
        idx = carve(labels_arr, train, test_fraction, seed=seed)
        splits[idx] = "test"
        train = np.flatnonzero(splits == "train")
    if "val" not in present and val_fraction > 0:
        idx = carve(labels_arr, train, val_fraction, seed=seed + 1)
        splits[idx] = "val"
    return list(splits)


def carve(labels: np.ndarray, pool: np.ndarray, fraction: float, *, seed: int) -> np.ndarray:
    """Pick ``fraction`` of ``pool`` (indices into ``labels``), stratified by label.

    Returns the sorted chosen indices (a subset of ``pool``); empty when ``fraction`` is 0 or the
    pool too small to give one image.
    """
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    if fraction <= 0 or len(pool) < 2:
        return np.empty(0, dtype=np.int64)
    n_out = math.ceil(fraction * len(pool))
    if n_out >= len(pool):
        n_out = len(pool) - 1
    pool_labels = labels[pool]
    classes, counts = np.unique(pool_labels, return_counts=True)
    small = np.isin(pool_labels, classes[counts < 2])
    if small.any():
        logger.warning(
            "%d class(es) have fewer than 2 images to split; their %d image(s) stay in train",
            int((counts < 2).sum()),
            int(small.sum()),
        )
    eligible = pool[~small]
    n_out = min(n_out, len(eligible) - 1)
    if n_out <= 0:
        return np.empty(0, dtype=np.int64)
    try:
        _, out = train_test_split(
            eligible, test_size=n_out, random_state=seed, stratify=labels[eligible]
        )
    except ValueError as e:
        logger.warning("cannot stratify %d held-out images (%s); splitting at random", n_out, e)
        _, out = train_test_split(eligible, test_size=n_out, random_state=seed, stratify=None)
    out = np.sort(np.asarray(out, dtype=np.int64))
    # Every class keeps at least one image in the pool it was carved from.
    rng = np.random.default_rng(seed)
    for c in np.unique(labels[out]):
        members = eligible[labels[eligible] == c]
        if np.isin(members, out).all():
            out = out[out != rng.choice(members)]
    return out
