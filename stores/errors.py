"""Store errors, and the project's one usage-error root :class:`InputError` (CLI exit code 2)."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator, Sequence


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


# ------------------------------------------------------------------ disk full, read-only, denied
_WRITE_FAILURES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
}
_FULL = (errno.ENOSPC, errno.EDQUOT)


class StorageError(InputError):
    """Writing failed for lack of space or permission. Nothing retries it: the user frees space
    or picks a writable place, then runs the same command again."""


def write_failure(exc: BaseException) -> OSError | None:
    """The disk-full / read-only / permission `OSError` behind ``exc`` (itself, its cause or its
    context), or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
            return e
        e = e.__cause__ or e.__context__
    return None


def storage_error(exc: BaseException, where: str, *, then: str) -> StorageError | None:
    """A one-line :class:`StorageError` for a write failure behind ``exc`` at ``where`` (a
    store, a folder), or None when ``exc`` is not one. ``then``: what the rerun does (for a
    store: resumes from its last whole chunk)."""
    e = write_failure(exc)
    if e is None:
        return None
    if e.errno in _FULL:
        fix = "free space there (or choose another place)"
    else:
        fix = "choose a writable place (--root, --out or CARROT_HOME) or fix its permissions"
    return StorageError(
        f"cannot write {where}: {_WRITE_FAILURES[e.errno]}; {fix}, then run the same command "
        f"again ({then})"
    )


@contextlib.contextmanager
def storage_errors(where: str, *, then: str) -> Iterator[None]:
    """Turn a disk-full / read-only / permission `OSError` raised in the block into a
    :class:`StorageError` naming ``where``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        mapped = storage_error(e, where, then=then)
        if mapped is None:
            raise
        raise mapped from e
