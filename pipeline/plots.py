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
    """One panel per curve present: the L-BFGS objective per iteration (plain heads), the
    minibatch training objective and validation balanced accuracy per epoch (``curves[name]``
    is steps × heads; NaN where a head was not in that phase). The best head drawn thick."""
    panels = [
        ("lbfgs_objective", "L-BFGS objective", "iteration"),
        ("train_loss", "minibatch objective", "epoch"),
        ("val_balanced_accuracy", "val balanced accuracy", "epoch"),
    ]
    shown = [
        (k, t, x) for k, t, x in panels if np.isfinite(np.asarray(curves.get(k) or [], float)).any()
    ]
    fig = Figure(figsize=(5 * max(1, len(shown)), 4))
    for i, (key, title, xlabel) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), i + 1)
        data = np.asarray(curves[key], dtype=float)
        steps = np.arange(1, data.shape[0] + 1)
        for h in range(data.shape[1]):
            if not np.isfinite(data[:, h]).any():
                continue
            best = h == best_index
            ax.plot(
                steps,
                data[:, h],
                lw=2.5 if best else 0.8,
                alpha=1.0 if best else 0.5,
                color="C3" if best else None,
                label=(labels[h] if labels else f"head {h}") if best else None,
            )
        if key == "lbfgs_objective":
            ax.set_yscale("log")
        if best_index is not None and np.isfinite(data[:, best_index]).any():
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(xlabel)
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
