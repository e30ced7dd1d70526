"""The per-epoch checkpoint of a fine-tuning run: write it atomically, read it back safely.

``checkpoint.pt`` holds the model, the optimizer (AdamW moments and step counts), the grad scaler
and EMA states, the epoch and optimizer step reached, the per-epoch history, the best epoch so
far and the settings. It is written to a temporary file, flushed and moved into place, so a
kill leaves the previous checkpoint; it is read with ``torch.load(weights_only=True)`` (no
pickled code runs).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "carrot-finetune"
VERSION = 1


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    """Replace ``folder/checkpoint.pt`` with ``payload`` (tensors moved to the CPU)."""
    from pipeline.heads.io import atomic_file

    path = folder / CHECKPOINT_FILE
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return path


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``folder``, or None when there is none.

    Raises:
        InputError: the file is not a readable fine-tune checkpoint (cut short, another format).
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise InputError(
            f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]}); delete it to "
            "start over, or give another --out"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path} is not a carrot finetune checkpoint; give another --out")
    if payload.get("version") != VERSION:
        raise InputError(
            f"{path} has checkpoint version {payload.get('version')!r}, this code reads "
            f"{VERSION}; start over with another --out"
        )
    return payload


def optimizer_state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two optimizer state dicts hold identical tensors and settings (for tests and
    resume checks)."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for key, sa in a["state"].items():
        sb = b["state"][key]
        if sa.keys() != sb.keys():
            return False
        for name, va in sa.items():
            vb = sb[name]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            if not same:
                return False
    return True
