"""PNG plots with matplotlib's Agg canvas (no pyplot, no global backend switch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_learning_curves(
    curves: dict[str, Sequence[Sequence[float]]],
    path: str | Path,
    *,
    best_index: int | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Two panels: train loss and validation balanced accuracy per epoch, one line per head
    (``curves[name]`` is epochs × heads); the best head drawn thick."""
    fig = Figure(figsize=(10, 4))
    panels = [("train_loss", "train loss"), ("val_balanced_accuracy", "val balanced accuracy")]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        data = np.asarray(curves.get(key) or [], dtype=float)
        if data.size:
            epochs = np.arange(1, data.shape[0] + 1)
            for h in range(data.shape[1]):
                best = h == best_index
                ax.plot(
                    epochs,
                    data[:, h],
                    lw=2.5 if best else 0.8,
                    alpha=1.0 if best else 0.5,
                    color="C3" if best else None,
                    label=(labels[h] if labels else f"head {h}") if best else None,
                )
            if best_index is not None:
                ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(
    confusion: np.ndarray, path: str | Path, *, class_names: Sequence[str] | None = None
) -> Path:
    """Row-normalized confusion matrix ``(C, C)`` (rows: true class) as an image; class
    names on the axes when C ≤ 40."""
    cm = np.asarray(confusion, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    C = cm.shape[0]
    size = min(12.0, 3.0 + 0.25 * C)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if class_names is not None and C <= 40:
        ax.set_xticks(range(C), labels=list(class_names), rotation=90, fontsize=7)
        ax.set_yticks(range(C), labels=list(class_names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion (row-normalized)")
    return _save(fig, path)
