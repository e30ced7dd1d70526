"""Errors that mean "the user's input is wrong": the CLI prints them on one line and exits 2.

One hierarchy for the whole project: :class:`InputError` is defined at the bottom layer
(`stores.errors`, so stores need nothing from `pipeline`) and every usage error derives from it,
the store ones (`stores.errors.StoreInputError` and its subclasses) included.
"""

from __future__ import annotations

from stores.errors import InputError, StoreInputError

__all__ = ["InputError", "StoreInputError"]
