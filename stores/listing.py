"""Finding stores: ``list_stores(root)`` → one :class:`StoreSummary` per ``<root>/*/*.zarr``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stores.location import is_url, join_url, open_group, resolve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreSummary:
    """One store under a root, from its attributes only (no array is read)."""

    url: str  # the store's URL or local path, usable with open_store
    dataset: str
    backbone: str
    n: int  # rows, valid or not
    dim: int  # feature width D
    complete: bool
    key: str  # content key, 64 hex
    views: int = 0
    dtype: str = ""
    problem: str | None = None  # why the attributes could not be read, if so


def _summarize(url: str, storage_options: dict | None) -> StoreSummary:
    dataset = url.rstrip("/").rsplit("/", 2)[-2]
    backbone = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".zarr")
    try:
        attrs = open_group(resolve(url, storage_options), mode="r").attrs.asdict()
        identity = attrs["identity"]
        return StoreSummary(
            url=url,
            dataset=identity["dataset"],
            backbone=identity["backbone"],
            n=int(attrs["n"]),
            dim=int(attrs["dim"]),
            complete=attrs.get("complete") is True,
            key=str(attrs["key"]),
            views=int(attrs["views"]),
            dtype=str(attrs["dtype"]),
        )
    except Exception as exc:
        logger.debug("cannot summarize %s", url, exc_info=True)
        return StoreSummary(
            url, dataset, backbone, 0, 0, False, "", problem=f"{type(exc).__name__}: {exc}"
        )


def list_stores(root: str, *, storage_options: dict | None = None) -> list[StoreSummary]:
    """Summaries of all stores ``<root>/<dataset>/<name>.zarr``, sorted by URL. Missing root → []."""
    location = resolve(root, storage_options)
    fs, base = location.fs, location.path.rstrip("/")
    if not fs.exists(base):
        return []
    found = sorted(p for p in fs.glob(f"{base}/*/*.zarr") if fs.isdir(p))
    prefix = location.url.rstrip("/")
    urls = []
    for path in found:
        relative = path[len(base) :].lstrip("/")  # "<dataset>/<name>.zarr"
        urls.append(join_url(prefix, relative) if is_url(prefix) else join_url(root, relative))
    return sorted((_summarize(u, storage_options) for u in urls), key=lambda s: s.url)
