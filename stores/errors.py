"""Store errors, and the project's one usage-error root :class:`InputError` (CLI exit code 2)."""

from __future__ import annotations

from collections.abc import Sequence


class InputError(ValueError):
    """Bad user input (any stage). The message names the input and says how to fix it; the CLI
    prints it on one line and exits 2. The one root of the project's usage errors:
    `pipeline.errors` re-exports it, :class:`StoreInputError` derives from it."""


class StoreError(Exception):
    """Something is wrong with an embedding store."""


class StoreInputError(StoreError, InputError):
    """A store error the user can fix (bad URL, store in use, store incomplete...)."""


class StoreLockedError(StoreInputError):
    """Another live writer holds the store's lock."""


class StoreNotFoundError(StoreInputError):
    """No embedding store at the given location."""


class StoreIncompleteError(StoreInputError):
    """The store exists but its ``complete`` marker is not set."""


class StoreCorruptError(StoreInputError):
    """The store exists but is damaged: files missing or unreadable, or metadata inconsistent.

    ``problems`` lists what is wrong, one short sentence each.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) or [message]


MAX_SHOWN = 3
"""At most this many problems in one error message (``carrot store verify`` lists them all)."""


def corrupt_error(url: str, problems: Sequence[str], *, resumable: bool) -> StoreCorruptError:
    """A one-line :class:`StoreCorruptError` naming the store, what is wrong and the fix.

    ``resumable``: only chunk files were lost, which ``carrot embed`` rewrites in place; otherwise
    the store must be deleted and rebuilt.
    """
    shown = "; ".join(" ".join(p.split()) for p in problems[:MAX_SHOWN])
    if len(problems) > MAX_SHOWN:
        shown += f" (+{len(problems) - MAX_SHOWN} more problems)"
    fix = (
        "re-run `carrot embed` with the same data and backbone to rewrite the lost chunks"
        if resumable
        else "delete the store folder and re-run `carrot embed` to rebuild it"
    )
    return StoreCorruptError(
        f"store {url} is damaged: {shown}. Run `carrot store verify {url}` for a full report, "
        f"then {fix}.",
        problems,
    )
