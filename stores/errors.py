"""Store errors. Subclasses of :class:`StoreInputError` are the user's to fix (CLI exit code 2)."""

from __future__ import annotations


class StoreError(Exception):
    """Something is wrong with an embedding store."""


class StoreInputError(StoreError, ValueError):
    """A store error the user can fix (bad URL, store in use, store incomplete...)."""


class StoreLockedError(StoreInputError):
    """Another live writer holds the store's lock."""


class StoreNotFoundError(StoreInputError):
    """No embedding store at the given location."""


class StoreIncompleteError(StoreInputError):
    """The store exists but its ``complete`` marker is not set."""
