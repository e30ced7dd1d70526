"""The embedding store: one Zarr v3 group per (data set, backbone, weights, transform, views, dtype).

Knows nothing of timm or Prefect. See :mod:`stores.schema` for the layout.
"""

from stores.errors import (
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreInputError,
    StoreLockedError,
    StoreNotFoundError,
)
from stores.identity import SCHEMA_VERSION, StoreIdentity, content_key
from stores.listing import StoreSummary, list_stores
from stores.location import store_url
from stores.reader import EmbeddingStore, open_store
from stores.schema import SPLITS
from stores.verify import VerifyReport, verify_store
from stores.writer import StoreWriter, open_writer

__all__ = [
    "SCHEMA_VERSION",
    "SPLITS",
    "EmbeddingStore",
    "StoreCorruptError",
    "StoreError",
    "StoreIdentity",
    "StoreIncompleteError",
    "StoreInputError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StoreSummary",
    "StoreWriter",
    "VerifyReport",
    "content_key",
    "list_stores",
    "open_store",
    "open_writer",
    "store_url",
    "verify_store",
]
