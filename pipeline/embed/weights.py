"""Backbone weights from outside the model code: local checkpoint files and hub availability.

- :func:`load_checkpoint_file` reads ``.safetensors`` or ``.pth``/``.pt`` safely (no pickled code),
  with one-line errors for files that are not checkpoints, are cut short or carry code.
- Loading is timm's own: ``timm.create_model(..., pretrained=True,
  pretrained_cfg_overlay=checkpoint_overlay(path))`` runs the model's registered checkpoint filter
  (e.g. resampled ViT position embeddings, DeiT-III layer-scale names), drops the classifier and
  loads. :func:`check_checkpoint_fits` runs that same load on the meta device first (no memory,
  no init), strictly, so missing keys, shape mismatches and NaN/Inf tensors are named before any
  weights are read into a model.
- :func:`ensure_hub_weights_available` asks huggingface_hub itself (its cache, then the Hub through
  the client's own proxy, auth and offline settings) and fails at once, naming ``--checkpoint``,
  when the weights can be neither found nor downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import timm
import torch

from pipeline.errors import InputError
from pipeline.terminal import one_line

__all__ = [
    "check_checkpoint_fits",
    "checkpoint_load_error",
    "checkpoint_overlay",
    "ensure_hub_weights_available",
    "file_sha256",
    "load_checkpoint_file",
    "pretrained_cfg",
]

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HUB_TIMEOUT_SECONDS = 10.0  # one metadata request, no retries: a check must fail fast
# timm's order for a Hub repo (timm.models._hub.load_state_dict_from_hf): the safetensors
# alternative of the file first, then the file itself.
_SAFE_ALTERNATIVES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of ``name`` (default tag when none given) as a dict; {} if none."""
    pcfg = timm.models.get_pretrained_cfg(name)
    return pcfg.to_dict() if pcfg is not None else {}


# --------------------------------------------------------------------------- hub weights


def ensure_hub_weights_available(name: str) -> None:
    """Fail at once, naming ``--checkpoint``, when the hub weights of ``name`` can be neither
    found in the local cache nor downloaded.

    For a Hugging Face repo: ``hf_hub_download(local_files_only=True)`` (the cache), then one
    ``get_hf_file_metadata`` request (the start of a real download, through huggingface_hub's
    own client: ``HTTPS_PROXY``, ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply).
    For a plain URL (a few legacy models): torch hub's cache, then one HEAD request through
    urllib (proxy variables apply).

    Raises:
        InputError: no pretrained weights exist, or they cannot be fetched (offline, host
            unreachable, repository missing or gated, no weights file).
    """
    pcfg = pretrained_cfg(name)
    hf_hub_id, url = pcfg.get("hf_hub_id"), pcfg.get("url")
    if not hf_hub_id and not url:
        raise InputError(
            f"timm has no pretrained weights for {name!r}; drop --pretrained (random init) or "
            "pass --checkpoint FILE with a local .safetensors/.pth"
        )
    why = (
        _hf_hub_problem(hf_hub_id, pcfg.get("hf_hub_filename")) if hf_hub_id else _url_problem(url)
    )
    if why is not None:
        raise InputError(
            f"cannot download pretrained weights for {name!r} ({why}) and they are not in the "
            "local cache. Pass --checkpoint FILE with a local .safetensors/.pth, or drop "
            "--pretrained for a random init, or run once with network access to cache them"
        )


def _hf_candidates(filename: str | None) -> list[str]:
    """The files timm tries, in its order, for a repo whose weights file is ``filename``."""
    filename = filename or "pytorch_model.bin"
    safe = _SAFE_ALTERNATIVES.get(filename)
    if safe is None and filename.endswith(".bin"):
        safe = filename[: -len(".bin")] + ".safetensors"
    return [safe, filename] if safe else [filename]


def _hf_hub_problem(hf_hub_id: str, filename: str | None) -> str | None:
    """None when one of the repo's weights files is cached or downloadable, else why not."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = hf_hub_id.partition("@")
    candidates = _hf_candidates(filename)
    for fname in candidates:
        try:
            hf_hub_download(repo, fname, revision=revision or None, local_files_only=True)
            return None
        except LocalEntryNotFoundError:
            continue
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    for fname in candidates:
        url = hf_hub_url(repo, fname, revision=revision or None)
        try:
            get_hf_file_metadata(url, timeout=_HUB_TIMEOUT_SECONDS)
            return None
        except OfflineModeIsEnabled:
            return "offline: HF_HUB_OFFLINE is set"
        except GatedRepoError:  # before RepositoryNotFoundError, its base class
            return (
                f"{repo} is a gated repository: accept its terms on {host} and log in "
                "(hf auth login, or set HF_TOKEN)"
            )
        except RepositoryNotFoundError:
            return f"{repo} is not a repository on {host}, or it is private: log in"
        except RevisionNotFoundError:
            return f"{repo} has no revision {revision!r}"
        except LocalEntryNotFoundError as e:  # a network failure, as hf_hub_download reports it
            return f"offline: cannot reach {host}{_via_proxy()} ({_quote(e.__cause__ or e)})"
        except EntryNotFoundError:
            continue  # try timm's next file name
        except Exception as e:  # httpx/requests connection, proxy, TLS and HTTP errors
            if isinstance(e.__cause__, OfflineModeIsEnabled):
                return "offline: HF_HUB_OFFLINE is set"
            return f"offline: cannot reach {host}{_via_proxy()} ({_quote(e)})"
    return f"{repo} has none of the weights files {candidates}"


def _via_proxy() -> str:
    """`` through proxy HOST:PORT`` when an HTTPS proxy is configured (no credentials shown)."""
    proxy = urllib.request.getproxies().get("https")
    if not proxy:
        return ""
    parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    where = f"{parsed.hostname}:{parsed.port}" if parsed.port else parsed.hostname
    return f" through proxy {where}"


def _url_problem(url: str) -> str | None:
    """None when the file at ``url`` is in torch hub's cache or answers a HEAD request."""
    from huggingface_hub import constants

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return None
    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE is set"
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "torch.hub"})
    try:
        with urllib.request.urlopen(request, timeout=_HUB_TIMEOUT_SECONDS):
            return None
    except urllib.error.HTTPError as e:
        return f"{url} answers HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        host = urlparse(url).hostname or url
        return f"offline: cannot reach {host}{_via_proxy()} ({_quote(e)})"


# --------------------------------------------------------------------------- checkpoint files


_SAVE_HINT = "torch.save(model.state_dict(), path)"
_TO_SAFETENSORS = (
    "convert it to .safetensors where it was made: "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)


def load_checkpoint_file(path: str) -> dict[str, torch.Tensor]:
    """Read a local checkpoint safely into a flat ``{name: tensor}`` state dict (CPU).

    ``.safetensors`` via safetensors; ``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``
    (pickled code is refused, never run). The entry timm's loader takes is unwrapped
    (``"state_dict_ema"``, ``"model_ema"``, ``"state_dict"`` or ``"model"``, in that order) and
    ``"module."`` / ``"_orig_mod."`` prefixes (DataParallel, torch.compile) are stripped.

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
        # the entry timm's own loader (timm.models.load_state_dict) takes, EMA weights first
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"checkpoint {path!r} is not a state dict of tensors (nor one under 'state_dict' or "
            "'model'); save model.state_dict()"
        )
    if not obj:
        raise InputError(f"checkpoint {path!r} holds no tensors; save model.state_dict()")
    return timm.models.clean_state_dict(obj)  # DataParallel / torch.compile prefixes, as timm


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
        # "Unsupported global: GLOBAL builtins.print …" or "… unsupported GLOBAL posix.system
        # whose module posix is blocked" (torch words it by what the global is)
        found = re.search(r"unsupported global(?:: GLOBAL)? ([\w.]+)", str(e), re.IGNORECASE)
        if found or "unsupported" in str(e).lower():
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


# Every local load: never the hub, and the file's classifier is of unknown size, so timm drops
# the classifier keys and loads non-strictly — as it does for any model whose pretrained
# config has a classifier of another size (also those, like DINOv2's, whose config has none).
_LOCAL_OVERLAY: dict[str, Any] = {"url": None, "hf_hub_id": None, "num_classes": -1}


def checkpoint_overlay(path: str) -> dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load the local file ``path``."""
    return {**_LOCAL_OVERLAY, "file": str(Path(path).expanduser())}


Builder = Callable[[dict[str, Any]], torch.nn.Module]
"""``pretrained_cfg_overlay`` → the model, built by ``timm.create_model(..., pretrained=True)``."""


def check_checkpoint_fits(build: Builder, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Check that timm loads ``state_dict`` into the model ``build`` makes, without weights.

    ``build`` runs on the meta device with a shape-only copy of ``state_dict``, twice at most:
    timm's checkpoint filter of the model, then a strict load that keeps the classifier keys
    (so nothing is dropped unseen): missing keys and shape mismatches are errors. If the only
    complaint is keys the model does not have (a classifier, extras), the load the real model
    gets (:func:`checkpoint_overlay`) must accept them. Then the tensors the model takes must be
    finite.

    Raises:
        InputError: missing keys or shape mismatches (named), a filter that fails on this
            checkpoint, keys timm will not drop, or NaN/Inf in a tensor the model takes.
    """
    overlay = {**_LOCAL_OVERLAY, "state_dict": {k: v.to("meta") for k, v in state_dict.items()}}
    unexpected: list[str] = []
    try:
        with torch.device("meta"):
            build({**overlay, "classifier": None})
    except InputError:
        raise
    except RuntimeError as e:
        problems = _load_problems(e)
        if problems is None or problems.missing or problems.mismatched or problems.other:
            raise _fit_error(path, e) from e
        unexpected = problems.unexpected
        try:
            with torch.device("meta"):
                build(overlay)
        except Exception as e2:
            raise _fit_error(path, e2) from e2
        logger.info(
            "checkpoint %s: dropping %d key(s) the model does not have: %s",
            path,
            len(unexpected),
            unexpected[:5],
        )
    except Exception as e:  # a filter written for another layout (KeyError, ...)
        raise _fit_error(path, e) from e
    skip = set(unexpected)
    _refuse_non_finite({k: v for k, v in state_dict.items() if k not in skip}, path)


def checkpoint_load_error(path: str, error: BaseException) -> InputError:
    """One-line InputError for timm failing to load checkpoint ``path`` (``error`` quoted)."""
    return InputError(
        f"cannot load checkpoint {path!r} ({_quote(error)}); check that the model name matches "
        "the checkpoint"
    )


def _fit_error(path: str, error: BaseException) -> InputError:
    """``does not fit`` naming the keys, for an error of torch's ``load_state_dict``."""
    problems = _load_problems(error) if isinstance(error, RuntimeError) else None
    if problems is None:
        return checkpoint_load_error(path, error)
    detail = []
    if problems.missing:
        detail.append(f"{len(problems.missing)} missing key(s), e.g. {problems.missing[:5]}")
    if problems.mismatched:
        n, some = len(problems.mismatched), problems.mismatched[:3]
        detail.append(f"{n} shape mismatch(es), e.g. {some}")
    if problems.unexpected and not detail:
        n, some = len(problems.unexpected), problems.unexpected[:5]
        detail.append(f"{n} key(s) the model does not have, e.g. {some}")
    detail += [one_line(line, limit=200) for line in problems.other[:1]]
    return InputError(
        f"checkpoint {path!r} does not fit {problems.model} ({'; '.join(detail)}); "
        "check that the model name matches the checkpoint"
    )


class _LoadProblems(NamedTuple):
    """What torch's ``load_state_dict`` complained about, by kind (key names as in the model)."""

    model: str  # class name
    missing: list[str]
    mismatched: list[str]  # "key (checkpoint shape) vs (model shape)"
    unexpected: list[str]
    other: list[str]


_LOAD_ERROR = re.compile(r"Error\(s\) in loading state_dict for (\w+):")
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)"
)


def _load_problems(error: RuntimeError) -> _LoadProblems | None:
    """The complaints in the message of torch's ``load_state_dict``; None for another error."""
    lines = str(error).split("\n\t")
    head = _LOAD_ERROR.match(lines[0])
    if head is None:
        return None
    problems = _LoadProblems(head.group(1), [], [], [], [])
    for line in lines[1:]:
        if line.startswith("Missing key(s) in state_dict:"):
            problems.missing.extend(re.findall(r'"([^"]*)"', line))
        elif line.startswith("Unexpected key(s) in state_dict:"):
            problems.unexpected.extend(re.findall(r'"([^"]*)"', line))
        elif m := _SIZE_MISMATCH.match(line):
            key, have, want = m.groups()
            problems.mismatched.append(f"{key} ({have}) vs ({want})")
        else:
            problems.other.append(line)
    return problems


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
