"""One writer per store: a lock file ``.carrot-lock`` inside the store folder.

The lock file holds JSON ``{host, pid, since, heartbeat, token}`` (times in Unix seconds). It is
created atomically where the filesystem allows (local: ``O_CREAT | O_EXCL``; fsspec: mode ``"xb"``,
else write-then-read-back, best effort). A lock is stale, and taken over, when its owner is
provably gone: same host and the pid is not alive (or, in this very process, the owning object was
dropped), or another host whose heartbeat is older than ``ttl_s``. The owner refreshes the
heartbeat on every written chunk; :meth:`StoreLock.refresh` also checks it still owns the lock.

Zarr ignores the file for reading and writing; listing the group's members while a writer holds
the lock warns about it (it is deleted on release).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
import weakref
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from stores.errors import StoreLockedError
from stores.location import StoreLocation

logger = logging.getLogger(__name__)

LOCK_NAME = ".carrot-lock"
DEFAULT_TTL_S = 900.0
"""Seconds without a heartbeat after which another host's lock counts as abandoned."""
UNREADABLE_GRACE_S = 60.0
"""Seconds after which a lock file that is not valid JSON counts as abandoned."""

_LIVE: weakref.WeakValueDictionary[str, StoreLock] = weakref.WeakValueDictionary()
"""Locks held by objects alive in this process, by token."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock; times are Unix seconds."""

    host: str
    pid: int
    since: float
    heartbeat: float
    token: str

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")
        age = max(0.0, time.time() - self.heartbeat)
        return f"host {self.host}, pid {self.pid}, since {since} (last heartbeat {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(raw: bytes) -> LockOwner | None:
    try:
        data = json.loads(raw.decode())
        return LockOwner(
            host=str(data["host"]),
            pid=int(data["pid"]),
            since=float(data["since"]),
            heartbeat=float(data["heartbeat"]),
            token=str(data["token"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class StoreLock:
    """Exclusive writer lock of one store. Use :meth:`acquire`, then ``refresh``/``release``."""

    def __init__(self, location: StoreLocation, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.location = location
        self.ttl_s = ttl_s
        self.owner: LockOwner | None = None  # set while held

    # -- file access -------------------------------------------------------------------------
    @property
    def _local(self) -> str | None:
        base = self.location.local_path
        return os.path.join(base, LOCK_NAME) if base is not None else None

    @property
    def _remote(self) -> str:
        return self.location.child(LOCK_NAME)

    def _read(self) -> bytes | None:
        try:
            if self._local is not None:
                with open(self._local, "rb") as f:
                    return f.read()
            return self.location.fs.cat_file(self._remote)
        except FileNotFoundError:
            return None

    def _create(self, payload: bytes) -> bool:
        """Create the lock file only if absent; True when this call created it."""
        if self._local is not None:
            os.makedirs(os.path.dirname(self._local), exist_ok=True)
            try:
                fd = os.open(self._local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            return True
        fs = self.location.fs
        with contextlib.suppress(Exception):
            fs.makedirs(self.location.path, exist_ok=True)
        try:
            with fs.open(self._remote, "xb") as f:
                f.write(payload)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):  # no exclusive create: best effort
            if fs.exists(self._remote):
                return False
            fs.pipe_file(self._remote, payload)
            return self._read() == payload

    def _overwrite(self, payload: bytes) -> None:
        if self._local is not None:
            tmp = f"{self._local}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(payload)
                os.replace(tmp, self._local)
            except BaseException:  # e.g. disk full: no temporary left behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.location.fs.pipe_file(self._remote, payload)

    def _remove_if(self, owner: LockOwner) -> bool:
        """Remove the lock file if it still holds ``owner``'s token; True when removed."""
        if self._local is None:
            current = _parse(self._read() or b"")
            if current is None or current.token != owner.token:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.location.fs.rm_file(self._remote)
            return True
        # Local: move it aside atomically, then check what we moved; put back a stranger's lock.
        aside = f"{self._local}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self._local, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as f:
            moved = _parse(f.read())
        if moved is None or moved.token == owner.token:
            os.unlink(aside)
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, self._local)  # never clobbers a lock created meanwhile
        os.unlink(aside)
        return False

    # -- policy ------------------------------------------------------------------------------
    def _stale_reason(self, owner: LockOwner) -> str | None:
        """Why ``owner``'s lock may be taken over, or None when it must be respected."""
        if owner.host == socket.gethostname():
            if owner.pid == os.getpid():
                return None if owner.token in _LIVE else "its owner in this process was dropped"
            return None if _pid_alive(owner.pid) else f"process {owner.pid} is no longer running"
        age = time.time() - owner.heartbeat
        return (
            f"no heartbeat for {age:.0f} s (ttl {self.ttl_s:.0f} s)" if age > self.ttl_s else None
        )

    def _refusal(self, owner: LockOwner | None) -> StoreLockedError:
        who = owner.describe() if owner else "an unreadable lock file"
        where = self._local or self.location.url.rstrip("/") + "/" + LOCK_NAME
        return StoreLockedError(
            f"store {self.location.url} is being written by another writer ({who}). Wait for it "
            f"to finish (`carrot embed --wait` does), or, if that writer is gone, delete the lock "
            f"file {where} and retry."
        )

    # -- public ------------------------------------------------------------------------------
    def acquire(self) -> StoreLock:
        """Take the lock or raise :class:`StoreLockedError` naming the store, owner and fix."""
        now = time.time()
        mine = LockOwner(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        payload = json.dumps(asdict(mine)).encode()
        for _attempt in range(3):
            if self._create(payload) and self._read() == payload:
                self.owner = mine
                _LIVE[mine.token] = self
                return self
            raw = self._read()
            if raw is None:
                continue  # released meanwhile: try again
            owner = _parse(raw)
            if owner is None:  # its writer died between creating and filling it, or garbage
                if time.time() - self._mtime() < UNREADABLE_GRACE_S:
                    raise self._refusal(None)
                logger.warning("removing the unreadable lock file of %s", self.location.url)
                self._force_remove()
                continue
            reason = self._stale_reason(owner)
            if reason is None:
                raise self._refusal(owner)
            logger.warning("taking over the lock of %s: %s", self.location.url, reason)
            self._remove_if(owner)
        raise self._refusal(_parse(self._read() or b""))

    def _mtime(self) -> float:
        try:
            if self._local is not None:
                return os.path.getmtime(self._local)
            return self.location.fs.modified(self._remote).timestamp()
        except Exception:
            return time.time()

    def _force_remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self._local is not None:
                os.unlink(self._local)
            else:
                self.location.fs.rm_file(self._remote)

    def refresh(self) -> None:
        """Check this lock is still ours and renew its heartbeat; StoreLockedError if taken."""
        if self.owner is None:
            raise StoreLockedError(f"lock of {self.location.url} is not held (released earlier)")
        current = _parse(self._read() or b"")
        if current is None or current.token != self.owner.token:
            self.owner = None
            raise self._refusal(current)
        self.owner = LockOwner(**{**asdict(self.owner), "heartbeat": time.time()})
        self._overwrite(json.dumps(asdict(self.owner)).encode())

    def release(self) -> None:
        """Delete the lock file if it is still ours. Safe to call twice."""
        owner, self.owner = self.owner, None
        if owner is None:
            return
        _LIVE.pop(owner.token, None)
        if not self._remove_if(owner):
            logger.warning("lock of %s was no longer ours at release", self.location.url)

    @property
    def held(self) -> bool:
        return self.owner is not None


def read_owner(location: StoreLocation) -> LockOwner | None:
    """The current lock owner of a store, or None when it is not locked."""
    raw = StoreLock(location)._read()
    return _parse(raw) if raw is not None else None
