"""Lazy public surfaces for the stage sub-packages (PEP 562).

Each sub-package's ``__init__`` names what it offers and in which module it lives; the module is
imported on first use only, so ``import pipeline.heads.bank`` does not pull in scikit-learn or
the stage-1 models, and ``carrot --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_surface(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``exports`` maps a public name to
    the sub-module (relative to ``package``) that defines it."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{module}"), name)

    def dir_() -> list[str]:
        return sorted(exports)

    return getattr_, dir_, sorted(exports)
