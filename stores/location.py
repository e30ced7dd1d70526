"""Where a store lives: local folders and fsspec URLs, the path layout, and opening Zarr groups.

Layout: ``<root>/<dataset>/<backbone>-<key[:12]>.zarr``. A plain path (or ``file://`` URL) is the
local filesystem; any other ``scheme://`` goes through fsspec (``memory://``, ``s3://`` with the
``s3`` extra...). Plain paths open as a Zarr ``LocalStore`` (atomic chunk writes); URLs as an
``FsspecStore``; ``file://`` gets ``auto_mkdir=True`` unless told otherwise.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from stores.errors import StoreInputError, StoreNotFoundError, corrupt_error
from stores.identity import StoreIdentity

if TYPE_CHECKING:
    import fsspec
    import zarr

KEY_PREFIX_LEN = 12
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_STORE_NAME = re.compile(r"^(?P<backbone>.+)-(?P<prefix>[0-9a-f]{12})\.zarr$")


def path_safe(name: str) -> str:
    """``name`` with every run of characters outside ``[A-Za-z0-9._-]`` replaced by ``-``."""
    safe = _UNSAFE.sub("-", name.strip())
    if not safe or safe in {".", ".."}:
        raise StoreInputError(f"{name!r} cannot be used in a store path; use letters and digits")
    return safe


def is_url(location: str) -> bool:
    """True for ``scheme://...`` (fsspec URL), False for a plain local path."""
    return "://" in location


def join_url(root: str, *parts: str) -> str:
    """``root/part/...`` for local paths and URLs alike (forward slashes)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def store_url(root: str, identity: StoreIdentity) -> str:
    """``<root>/<dataset>/<backbone>-<key prefix, 12 hex>.zarr`` for ``identity``."""
    if not isinstance(root, str) or not root:
        raise StoreInputError(f"store root must be a folder or URL, got {root!r}")
    if not is_url(root):
        root = os.path.expanduser(root)
    name = f"{path_safe(identity.backbone)}-{identity.key()[:KEY_PREFIX_LEN]}.zarr"
    return join_url(root, path_safe(identity.dataset), name)


def key_prefix_of(url: str) -> str | None:
    """Key prefix in a store's folder name (``...-<12 hex>.zarr``), or None if it has none."""
    match = _STORE_NAME.match(url.rstrip("/").rsplit("/", 1)[-1])
    return match["prefix"] if match else None


@dataclass(frozen=True)
class StoreLocation:
    """A store's URL (or local path) resolved once: filesystem, local path, Zarr store."""

    url: str  # as given, without a trailing slash
    storage_options: dict = field(default_factory=dict)  # fsspec options (file:// gets auto_mkdir)

    @cached_property
    def local_path(self) -> str | None:
        """Absolute local path when the store is on this machine's filesystem, else None."""
        if not is_url(self.url):
            return os.path.abspath(os.path.expanduser(self.url))
        if self.url.startswith("file://"):
            return os.path.abspath(self.url[len("file://") :])
        return None

    @cached_property
    def _fs_and_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        import fsspec

        if self.local_path is not None and not is_url(self.url):
            return fsspec.filesystem("file"), self.local_path
        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StoreInputError(
                f"cannot open {self.url!r}: {exc}. For s3:// install the s3 extra "
                f"(pip install 'carrot-pipeline[s3]'); check the URL and storage_options."
            ) from exc

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """Synchronous fsspec filesystem holding the store."""
        return self._fs_and_path[0]

    @property
    def path(self) -> str:
        """The store's path within :attr:`fs`."""
        return self._fs_and_path[1]

    def child(self, name: str) -> str:
        """Path within :attr:`fs` of a file directly inside the store folder."""
        return f"{self.path.rstrip('/')}/{name}"

    def exists(self) -> bool:
        """True when the store folder holds Zarr group metadata."""
        return self.fs.exists(self.child("zarr.json"))

    def zarr_store(self, *, read_only: bool) -> zarr.abc.store.Store:
        """A Zarr store object rooted at the store folder."""
        from zarr.storage import FsspecStore, LocalStore

        if not is_url(self.url):
            if not read_only:
                os.makedirs(self.local_path, exist_ok=True)
            return LocalStore(self.local_path, read_only=read_only)
        return FsspecStore.from_url(
            self.url, storage_options=dict(self.storage_options), read_only=read_only
        )


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> StoreLocation:
    """Resolve a store URL or local path; ``file://`` defaults to ``auto_mkdir=True``."""
    if not isinstance(url, str) or not url.strip():
        raise StoreInputError(f"store location must be a folder or URL, got {url!r}")
    options = dict(storage_options or {})
    if url.startswith("file://"):
        options.setdefault("auto_mkdir", True)
    return StoreLocation(url.rstrip("/") or url, options)


def require_store(location: StoreLocation) -> StoreLocation:
    """``location``, or StoreNotFoundError when no store (no group ``zarr.json``) is there."""
    if not location.exists():
        raise StoreNotFoundError(
            f"no embedding store at {location.url!r} (no zarr.json there); check the URL, or "
            f"write the store first (carrot embed)."
        )
    return location


def open_group(location: StoreLocation, *, mode: str) -> zarr.Group:
    """Open the store's root group: ``mode="r"`` (must exist) or ``"a"`` (created if missing).

    ``mode="r"`` raises StoreNotFoundError when there is no store, StoreCorruptError (naming the
    file) when its ``zarr.json`` cannot be parsed.
    """
    import zarr

    if mode != "r":
        return zarr.open_group(store=location.zarr_store(read_only=False), mode=mode, zarr_format=3)
    store = require_store(location).zarr_store(read_only=True)
    try:
        return zarr.open_group(store=store, mode="r", zarr_format=3)
    except (ValueError, TypeError, KeyError) as exc:  # torn or edited zarr.json
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())
        problem = f"{location.url}/zarr.json is unreadable ({detail})"
        raise corrupt_error(location.url, [problem], resumable=False) from exc


def write_denied(folder: str | os.PathLike) -> OSError | None:
    """Why a file cannot be created in the local ``folder`` (the `OSError` of creating and
    removing a probe file), or None when it can. Unlike `os.access`, this sees read-only mounts
    and special file systems as root too."""
    probe = os.path.join(folder, f".carrot-write-check-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        return e
    return None
