"""Every PNG plot of the project, drawn on matplotlib's Agg canvas (no pyplot state, no global
backend switch): learning curves and confusion matrices of a run, method comparisons of the demo
and of ``carrot bench quality``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
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


def plot_method_comparison(rows: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars: top-1 accuracy (%) per regime, one bar per method (± std when given)."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(1.6 + 1.8 * len(regimes), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for m, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for g, regime in enumerate(regimes):
            for r in rows:
                if r["method"] == method and r["regime"] == regime and r["top1"] is not None:
                    xs.append(g + m * width)
                    ys.append(100 * r["top1"])
                    errs.append(100 * (r.get("top1_std") or 0.0))
        ax.bar(xs, ys, width, yerr=errs, label=method, capsize=3)
    ax.set_xticks([g + width * (len(methods) - 1) / 2 for g in range(len(regimes))], regimes)
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def plot_accuracy_vs_shots(
    curves: dict[str, list[tuple[float, float, float, float]]], path: str | Path, *, title: str
) -> Path:
    """Accuracy vs shots per method: ``{method: [(shots, mean, lo, hi), ...]}`` (fractions).

    The full-data point, if any, is given as ``shots = inf`` and drawn at the right edge.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_prop_cycle(color=colormaps["tab20"].colors[: max(1, len(curves))])
    finite = sorted({s for pts in curves.values() for s, *_ in pts if s != float("inf")})
    right = (max(finite) * 2) if finite else 1
    for method, pts in curves.items():
        pts = sorted(pts, key=lambda p: p[0])
        xs = [right if s == float("inf") else s for s, *_ in pts]
        mean = [100 * m for _, m, _, _ in pts]
        lo = [100 * m - 100 * a for _, m, a, _ in pts]
        hi = [100 * b - 100 * m for _, m, _, b in pts]
        ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ticks = finite + (
        [right] if any(s == float("inf") for p in curves.values() for s, *_ in p) else []
    )
    ax.set_xticks(ticks, [str(int(t)) if t != right else "all" for t in ticks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path, dpi=110)
