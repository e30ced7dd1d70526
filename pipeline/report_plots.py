"""Plots of comparisons between methods (demo table, quality benchmark). Agg backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_method_comparison(rows: Sequence[dict], path: str | Path) -> Path:
    """Grouped bars: top-1 accuracy (%) per regime, one bar per method (± std when given)."""
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(regimes), 3.6))
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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_shots(
    curves: dict[str, list[tuple[float, float, float, float]]], path: str | Path, *, title: str
) -> Path:
    """Accuracy vs shots per method: ``{method: [(shots, mean, lo, hi), ...]}`` (fractions).

    The full-data point, if any, is given as ``shots = inf`` and drawn at the right edge.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[: max(1, len(curves))])
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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
