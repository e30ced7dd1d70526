"""Backbone weights from outside the model code: local checkpoint files and hub availability.

- :func:`load_checkpoint_file` reads ``.safetensors`` or ``.pth``/``.pt`` safely (no pickled code),
  with one-line errors for files that are not checkpoints, are cut short or carry code.
- :func:`fit_state_dict` checks a state dict against a ``num_classes=0`` timm model (missing
  keys, shape mismatches, NaN/Inf values; works on a meta-device model) and
  :func:`load_state_dict_into` loads it.
- :func:`ensure_hub_weights_available` fails at once, naming ``--checkpoint``, when hub weights
  are neither cached locally nor downloadable.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch

from pipeline.errors import InputError
from pipeline.terminal import one_line

__all__ = [
    "ensure_hub_weights_available",
    "file_sha256",
    "fit_state_dict",
    "load_checkpoint_file",
    "load_state_dict_into",
    "pretrained_cfg",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HUB_PROBE_SECONDS = 2.0


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (default tag when none given) as a dict; {} if none."""
    pcfg = timm.models.get_pretrained_cfg(name)
    return pcfg.to_dict() if pcfg is not None else {}


# --------------------------------------------------------------------------- hub weights


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def ensure_hub_weights_available(name: str) -> None:
    """Fail at once, naming ``--checkpoint``, when hub weights can be neither found in the local
    cache nor downloaded (``HF_HUB_OFFLINE=1`` or the host unreachable within 2 s)."""
    pcfg = pretrained_cfg(name)
    hf_hub_id, url = pcfg.get("hf_hub_id"), pcfg.get("url")
    if not hf_hub_id and not url:
        raise InputError(
            f"timm has no pretrained weights for {name!r}; drop --pretrained (random init) or "
            "pass --checkpoint FILE with a local .safetensors/.pth"
        )
    if hf_hub_id and _in_hf_cache(hf_hub_id, pcfg.get("hf_hub_filename")):
        return
    if url and _in_torch_hub_cache(url):
        return
    if hf_hub_id:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    else:
        host = urlparse(url).hostname or ""
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else None
    if why is None and not _reachable(host):
        why = f"{host} is unreachable"
    if why is not None:
        raise InputError(
            f"cannot download pretrained weights for {name!r} (offline: {why}) and they are not "
            "in the local cache. Pass --checkpoint FILE with a local .safetensors/.pth, or "
            "drop --pretrained for a random init, or run once with network access to cache them"
        )


def _in_hf_cache(hf_hub_id: str, filename: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hf_hub_id.partition("@")
    names = [filename] if filename else []
    names += [
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
    ]
    for fname in names:
        found = try_to_load_from_cache(repo, fname, revision=revision or None)
        if isinstance(found, str):
            return True
    return False


def _in_torch_hub_cache(url: str) -> bool:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return path.is_file()


@functools.lru_cache(maxsize=8)
def _reachable(host: str) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=_HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- checkpoint files


_SAVE_HINT = "torch.save(model.state_dict(), path)"
_TO_SAFETENSORS = (
    "convert it to .safetensors where it was made: "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """Read a local checkpoint safely into a flat ``{name: tensor}`` state dict (CPU).

    ``.safetensors`` via safetensors; ``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``
    (pickled code is refused, never run). A dict nested under ``"state_dict"`` or ``"model"`` is
    unwrapped; a ``"module."`` prefix (DataParallel) is stripped.

    Raises:
        InputError: one line naming the file: missing, not a checkpoint (text, empty, another
            format), truncated or corrupt, carrying pickled code, or not a dict of tensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(
            f"checkpoint {path!r} does not exist; pass a local .safetensors or .pth file"
        )
    suffix = p.suffix.lower()
    if suffix not in _CHECKPOINT_SUFFIXES:
        raise InputError(
            f"checkpoint {path!r} has an unknown type {suffix or '(none)'}; use .safetensors or .pth/.pt"
        )
    obj = _read_safetensors(p, path) if suffix == ".safetensors" else _read_torch(p, path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"checkpoint {path!r} is not a state dict of tensors (nor one under 'state_dict' or "
            "'model'); save model.state_dict()"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _read_safetensors(p: Path, path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: one line, the file named
        raise InputError(
            f"cannot read checkpoint {path!r} ({_quote(e)}); it is truncated, corrupt or not a "
            ".safetensors file: copy it again or save it with safetensors.torch.save_file"
        ) from None


def _read_torch(p: Path, path: str) -> Any:
    """``torch.load(weights_only=True)`` after checking the file looks like one torch wrote."""
    with p.open("rb") as f:
        head = f.read(512)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip, or legacy pickle
        raise InputError(
            f"checkpoint {path!r} is not a PyTorch checkpoint ({_what_is(head)}); pass a "
            f".safetensors file or a .pth written by {_SAVE_HINT}"
        )
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found or "Unsupported" in str(e):
            what = found.group(1) if found else "objects other than tensors"
            raise InputError(
                f"checkpoint {path!r} is refused: it carries pickled code ({what}), which carrot "
                f"never runs; {_TO_SAFETENSORS}, or re-save a plain state dict ({_SAVE_HINT})"
            ) from None
        raise InputError(
            f"cannot read checkpoint {path!r}: its pickle data is corrupt; copy it again or "
            f"re-save it ({_SAVE_HINT})"
        ) from None
    except Exception as e:  # truncated zip, foreign zip, bad records: torch raises many types
        raise InputError(
            f"cannot read checkpoint {path!r} ({_quote(e)}); it is truncated, corrupt or not "
            f"written by torch.save: copy it again or re-save it ({_SAVE_HINT})"
        ) from None


def _what_is(head: bytes) -> str:
    """A few words on what a file that is no checkpoint looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    if len(head) > 8 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "it is a .safetensors file: rename it to .safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "it looks like text"
    return "no zip or pickle header"


def _quote(e: BaseException) -> str:
    """``Type: message`` of a library error on one line, unless it gives loading advice."""
    text = one_line(e, limit=200)
    return type(e).__name__ if "weights_only" in text else f"{type(e).__name__}: {text}"


def fit_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` that ``model`` (num_classes=0) takes, checked.

    timm's checkpoint filter of the model family runs first (e.g. resampled ViT position
    embeddings); classifier keys are dropped; other extra keys are logged. Works on a model
    built on the meta device (only names and shapes are compared).

    Raises:
        InputError: missing backbone keys, shape mismatches, or NaN/Inf values in a kept
            tensor (named).
    """
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own conversion (e.g. resampled ViT position embeddings)
        try:
            state_dict = filter_fn(dict(state_dict), model)
        except Exception as e:  # a filter written for another layout: check the raw keys below
            logger.debug(
                "checkpoint filter of %s failed (%s); using the keys as saved",
                type(model).__name__,
                e,
            )
    own = model.state_dict()
    classifier = (
        model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    )
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    extra = [k for k in state_dict if k not in own]
    dropped = [k for k in extra if any(k == h or k.startswith(h + ".") for h in heads)]
    unexpected = [k for k in extra if k not in dropped]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    bad_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or bad_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if bad_shape:
            detail.append(f"{len(bad_shape)} shape mismatch(es), e.g. {bad_shape[:3]}")
        raise InputError(
            f"checkpoint {path!r} does not fit {type(model).__name__} ({'; '.join(detail)}); "
            "check that the model name matches the checkpoint"
        )
    if dropped:
        logger.info("checkpoint %s: dropped %d classifier key(s) (%s)", path, len(dropped), heads)
    if unexpected:
        logger.warning(
            "checkpoint %s: ignoring %d key(s) the model does not have, e.g. %s",
            path,
            len(unexpected),
            unexpected[:5],
        )
    keep = {k: v for k, v in state_dict.items() if k in own}
    _refuse_non_finite(keep, path)
    return keep


def _refuse_non_finite(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """InputError naming the first tensor holding NaN or Inf (floating and complex only)."""
    bad = [
        k
        for k, v in state_dict.items()
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    ]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise InputError(
            f"checkpoint {path!r} holds NaN/Inf in tensor {bad[0]!r}{more}; its features would "
            "be NaN/Inf: use weights saved before training diverged, or another --checkpoint"
        )


def load_state_dict_into(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str
) -> None:
    """Check ``state_dict`` with :func:`fit_state_dict` and load it into ``model``."""
    model.load_state_dict(fit_state_dict(model, state_dict, path), strict=False)


def file_sha256(path: str) -> str:
    """sha256 hex of the checkpoint file's bytes (memoized per path, size and mtime)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(
            f"checkpoint {path!r} does not exist; pass a local .safetensors or .pth file"
        )
    st = p.stat()
    return _sha256_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
