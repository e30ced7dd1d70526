"""argparse value types with one-line errors that name the expected value."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type, what: str):
    try:
        if not text.isascii():  # int() and float() also read other scripts' digits
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """``"1,5,10"`` → ``(1, 5, 10)``; every value an integer ≥ 1, none twice."""
    values = tuple(positive_int(v.strip()) for v in text.split(",") if v.strip())
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected distinct positive integers, comma-separated, got {text!r}"
        )
    return values


def nonneg_int(text: str) -> int:
    value = _number(text, int, "an integer ≥ 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def threads_or_auto(text: str) -> int | None:
    """``auto`` → None (the thread policy of `pipeline.threads`), else an integer ≥ 1."""
    if text.strip().lower() == "auto":
        return None
    expected = "a positive integer, or auto (one thread for small banks, all cores for large)"
    value = _number(text, int, expected)  # ASCII digits only, as every numeric option
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a finite number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(text, float, "a finite number ≥ 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float, "a number in (0, 1)")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _float_list(text: str, *, positive: bool) -> tuple[float, ...]:
    bound = "> 0" if positive else "≥ 0"
    expected = f"comma-separated finite numbers {bound}"
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (no values)")
    for v in values:
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {v:g} in {text!r}")
    return values


def positive_floats(text: str) -> tuple[float, ...]:
    """``"1e-3,1e-2"`` → ``(0.001, 0.01)``; every value finite and > 0 (learning rates)."""
    return _float_list(text, positive=True)


def nonneg_floats(text: str) -> tuple[float, ...]:
    """``"0,1e-2"`` → ``(0.0, 0.01)``; every value finite and ≥ 0 (weight decays)."""
    return _float_list(text, positive=False)


def _dask_address(text: str) -> str:
    from pipeline.cluster import check_address

    try:
        return check_address(text)
    except ValueError as e:  # InputError
        raise argparse.ArgumentTypeError(str(e).removeprefix("--dask-address ")) from None


def add_dask_options(p: argparse.ArgumentParser) -> None:
    """``--dask-address`` | ``--dask-workers`` (see `pipeline.cluster`)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--dask-address",
        type=_dask_address,
        metavar="URL",
        help="run on an existing Dask cluster, e.g. tcp://host:8786 (store root and data on "
        "shared storage)",
    )
    g.add_argument(
        "--dask-workers",
        type=positive_int,
        metavar="N",
        help="run on a local Dask cluster of N worker processes",
    )


def dask_options(args: argparse.Namespace):
    """The :class:`pipeline.cluster.DaskOptions` of the command line."""
    from pipeline.cluster import DaskOptions

    return DaskOptions(address=args.dask_address, workers=args.dask_workers)


def add_weights_options(p: argparse.ArgumentParser) -> None:
    """The backbone's weights: ``--pretrained`` | ``--checkpoint FILE`` (one of them), ``--seed``."""
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true", help="hub weights (needs network or cache)")
    w.add_argument("--checkpoint", metavar="FILE", help="local .safetensors or .pth weights")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random-init seed (default 0)")


def checked_checkpoint(path: str | None) -> str | None:
    """``--checkpoint`` when it names a file; `InputError` naming the fix otherwise."""
    import os

    from pipeline.errors import InputError

    if path and not os.path.isfile(path):
        raise InputError(
            f"--checkpoint {path!r}: no such file; give a local .safetensors or .pth file"
        )
    return path
