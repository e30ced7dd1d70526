"""Predict with a trained `Head` (or a partially frozen run's top) and write predictions as CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError


@torch.no_grad()
def predict(
    head: nn.Module,
    X: Any,
    *,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``head`` over raw features ``X (N, D)`` → ``pred (N,) int64``, ``probs (N, C)
    float32`` (softmax). ``device`` defaults to the head's device."""
    dev = torch.device(device) if device is not None else next(head.parameters()).device
    was_training = head.training
    head.eval()
    Xt = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
    out = []
    for start in range(0, Xt.shape[0], batch_size):
        xb = Xt[start : start + batch_size].to(dev, dtype=torch.float32, non_blocking=True)
        out.append(torch.softmax(head(xb).float(), dim=-1).cpu())
    head.train(was_training)
    C = head.num_classes if hasattr(head, "num_classes") else None
    probs = torch.cat(out).numpy() if out else np.zeros((0, C or 0), dtype=np.float32)
    return probs.argmax(axis=1).astype(np.int64), probs.astype(np.float32, copy=False)


def write_predictions_csv(
    path: str | Path,
    *,
    probs: np.ndarray,
    class_names: Sequence[str],
    ids: Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    k: int = 5,
) -> Path:
    """Write one row per sample: ``id, label, pred, prob, top5, top5_probs``.

    ``probs (N, C)``; ``label``/``pred`` are class names; ``prob`` is the predicted class's
    probability; ``top5`` lists the k most probable class names joined by ``|`` (``top5_probs``
    likewise). ``ids`` default to the row index; ``label`` is empty when ``labels`` is None.
    The file is replaced atomically: a failure midway leaves the previous file (or none).
    """
    from pipeline.heads.io import atomic_file

    path = Path(path)
    n, C = probs.shape
    _check_rows(n, C, class_names=class_names, ids=ids, labels=labels)
    k = max(1, min(k, C))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    pred = top[:, 0]
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "pred", "prob", "top5", "top5_probs"])
        for i in range(n):
            w.writerow(
                [
                    ids[i] if ids is not None else i,
                    class_names[int(labels[i])] if labels is not None else "",
                    class_names[int(pred[i])],
                    f"{probs[i, pred[i]]:.6f}",
                    "|".join(class_names[int(c)] for c in top[i]),
                    "|".join(f"{probs[i, c]:.6f}" for c in top[i]),
                ]
            )
    return path


def _check_rows(
    n: int,
    C: int,
    *,
    class_names: Sequence[str],
    ids: Sequence[str] | None,
    labels: np.ndarray | None,
) -> None:
    """``C`` class names, ``n`` ids and ``n`` labels in ``[0, C)`` (else ValueError)."""
    if len(class_names) != C:
        raise ValueError(f"{len(class_names)} class names for probabilities of {C} classes")
    if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} rows")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels of shape {labels.shape} for {n} rows")
        if n and (labels.min() < 0 or labels.max() >= C):
            raise ValueError(f"labels outside 0..{C - 1} (the {C} class names)")


def check_head_fits(
    config: dict[str, Any], store: Any, *, head_dir: str | Path, allow_other_classes: bool = False
) -> bool:
    """Check a saved head (its ``config.json``) against a store (``.dim``, ``.class_names``,
    ``.url``) before predicting. Returns True when the store has the head's classes (same names,
    same order), so its labels can be scored; False for other classes when
    ``allow_other_classes``. Raises InputError for another feature width, or other classes."""
    if int(config["dim"]) != int(store.dim):
        raise InputError(
            f"--head {head_dir} expects D={config['dim']} features but {store.url} has "
            f"D={store.dim}; use a head trained on a store of the same backbone and cache point"
        )
    head_names, store_names = list(config["class_names"]), list(store.class_names)
    if head_names == store_names:
        return True
    if allow_other_classes:
        return False
    how = (
        "the same names in another order"
        if sorted(head_names) == sorted(store_names)
        else f"{len(store_names)} classes ({_preview(store_names)})"
    )
    trained_on = (config.get("store") or {}).get("url") or "its training store"
    raise InputError(
        f"--head {head_dir} was trained on {trained_on} with {len(head_names)} classes "
        f"({_preview(head_names)}) but {store.url} has {how}; predict on a store with the "
        "head's classes, or pass --allow-other-classes to predict without labels or accuracy"
    )


def _preview(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … {len(names) - n} more" if len(names) > n else "")


@dataclass
class Predictor:
    """What ``carrot predict --head DIR`` runs: a saved head, or a partially frozen run's top
    (`pipeline.heads.top_io`), checked against the store it predicts."""

    model: nn.Module  # (B, store dim) → (B, C) logits
    class_names: list[str]
    labelled: bool  # the store has the model's classes: its labels can be scored
    batch_rows: int


def open_predictor(head_dir: str | Path, store: Any, *, allow_other_classes: bool) -> Predictor:
    """Load ``head_dir`` (a head folder or a partially frozen run) and check it fits ``store``
    (width or cache point, classes). `InputError` naming the fix when it does not."""
    from pipeline.heads import top_io
    from pipeline.heads.io import load_head

    if top_io.is_top_run(head_dir):
        config = top_io.read_top_config(head_dir)
        labelled = top_io.check_top_fits(
            config, store, run_dir=head_dir, allow_other_classes=allow_other_classes
        )
        _, shape = top_io.cache_point(store)
        model = top_io.TopClassifier(top_io.load_top(head_dir), shape)
        return Predictor(model, list(config["class_names"]), labelled, model.batch_rows)
    head, config = load_head(head_dir)
    labelled = check_head_fits(
        config, store, head_dir=head_dir, allow_other_classes=allow_other_classes
    )
    return Predictor(head, list(config["class_names"]), labelled, 8192)
