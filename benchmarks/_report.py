"""Tiny shared helpers for benchmarks: describe the machine, time a callable, print + save rows."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

__all__ = ["describe_machine", "format_table", "median_time", "write_report"]


def describe_machine() -> dict[str, Any]:
    """CPU model, core and torch thread counts, torch/Python versions, GPU name (or None)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], *, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls.

    Synchronizes CUDA around every call when CUDA is in use.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_cell(value: Any, *, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, None as empty."""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def format_table(
    columns: Sequence[str], rows: Sequence[dict[str, Any]], *, digits: int = 4, left: bool = False
) -> list[str]:
    """Plain-text table lines: header, rule, one line per row (cells right-aligned by default)."""
    table = [
        list(columns),
        *[[format_cell(r.get(c), digits=digits) for c in columns] for r in rows],
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    out = []
    for i, line in enumerate(table):
        cells = zip(line, widths, strict=True)
        out.append("  ".join(c.ljust(w) if left else c.rjust(w) for c, w in cells))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def write_report(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    json_path: str | Path | None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Print ``rows`` as a plain-text table, and write them with the machine to ``json_path``."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    machine = describe_machine()
    where = machine["gpu"] or machine["cpu"]
    print(f"{name} — {where} ({machine['torch_threads']} threads, torch {machine['torch']})")
    print("\n".join(format_table(columns, rows)))
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "name": name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "rows": list(rows),
            "extra": extra or {},
        }
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
