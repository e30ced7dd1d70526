"""What a store holds, and its content key: the sha256 of that identity as canonical JSON.

Two stores share a key exactly when every input that shapes their bytes is the same: the data set
and a fingerprint of its files, the backbone and its weights, the data config (resize, crop,
normalization), the number of views, the storage dtype and the library versions. Any change gives
a new key, hence a new path, so a stale store is never reused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from stores.errors import StoreInputError

SCHEMA_VERSION = 1
"""Version of the on-disk layout; part of every content key."""

STORE_DTYPES = ("float16", "float32")
WEIGHT_KINDS = {"hub": "tag", "checkpoint": "sha256", "random": "seed"}
"""Weight identity kinds and the field each one needs."""


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples → lists, NumPy scalars/arrays → Python)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise StoreInputError(f"identity keys must be strings, got {k!r}")
            out[k] = jsonable(v)
        return out
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreInputError(f"identity values must be finite, got {value!r}")
        return value
    tolist = getattr(value, "tolist", None)  # NumPy scalars and arrays
    if callable(tolist):
        return jsonable(tolist())
    raise StoreInputError(
        f"identity values must be JSON data (str, number, bool, list, dict), got "
        f"{type(value).__name__}: {value!r}"
    )


def canonical_json(value: Any) -> str:
    """Canonical JSON text of ``value``: sorted keys, no spaces, ASCII, tuples as lists."""
    return json.dumps(
        jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that determines a store's content. Dict fields are normalized to plain JSON."""

    dataset: str  # data set name, used in the path, e.g. "digits"
    backbone: str  # timm model name
    weights: dict  # {"kind": "hub", "tag"} | {"kind": "checkpoint", "sha256"} | {"kind": "random", "seed"}
    data_config: (
        dict  # timm data config used: input_size, mean, std, interpolation, crop_pct, crop_mode
    )
    views: int  # augmented views stored beside the clean one (0 = none)
    dtype: str  # storage dtype of features: "float16" | "float32"
    versions: dict  # {"timm": "...", "torch": "..."}
    input_fingerprint: str  # hex digest over the inputs (ImageSource.fingerprint)
    extra: dict = field(default_factory=dict)  # anything else that changes content (e.g. view seed)

    def __post_init__(self) -> None:
        for name in ("dataset", "backbone", "input_fingerprint"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise StoreInputError(
                    f"StoreIdentity.{name} must be a non-empty string, got {value!r}"
                )
        if self.dtype not in STORE_DTYPES:
            raise StoreInputError(
                f"StoreIdentity.dtype must be one of {STORE_DTYPES}, got {self.dtype!r}"
            )
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0:
            raise StoreInputError(f"StoreIdentity.views must be an int >= 0, got {self.views!r}")
        for name in ("weights", "data_config", "versions", "extra"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise StoreInputError(f"StoreIdentity.{name} must be a dict, got {value!r}")
            object.__setattr__(self, name, json.loads(canonical_json(value)))
        kind = self.weights.get("kind")
        if kind not in WEIGHT_KINDS or WEIGHT_KINDS[kind] not in self.weights:
            raise StoreInputError(
                f"StoreIdentity.weights must name its kind and identity, one of "
                f'{{"kind": "hub", "tag": ...}}, {{"kind": "checkpoint", "sha256": ...}}, '
                f'{{"kind": "random", "seed": ...}}; got {self.weights!r}'
            )

    def __hash__(self) -> int:
        return hash(self.key())

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of all fields (what the store keeps in its ``identity`` attribute)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreIdentity:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        try:
            return cls(**data)
        except TypeError as exc:
            raise StoreInputError(f"not a store identity: {exc}") from exc

    def key(self) -> str:
        """Content key, 64 hex characters (see :func:`content_key`)."""
        return content_key(self)


def content_key(identity: StoreIdentity) -> str:
    """sha256 hex of the canonical JSON of ``identity`` plus :data:`SCHEMA_VERSION`."""
    payload = {"schema_version": SCHEMA_VERSION, "identity": identity.to_dict()}
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()
