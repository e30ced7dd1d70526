"""The fine-tuned model: a trainable timm backbone under stage 2's LayerNorm + Linear head.

``forward(x) → (z, logits)``: ``z = head.norm(backbone(x))`` is the head's post-LayerNorm input
(B, D), where CARROT acts, and ``logits = head.fc(z)`` (B, C). LayerNorm runs once: the seed's
train step normalized ``z`` a second time (docs/CARROT.md, bug 3).

Warm start (`warm_start_head`): a stage-2 run folder (``--init-head``), checked against the
backbone and the classes, or else a linear probe fitted on the frozen backbone's embeddings
(L-BFGS, weight decay picked on val: LP-FT). Export (`export_files`): the backbone's state dict
as timm names it (``carrot embed --checkpoint`` loads it) and the head as a saved head folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.heads.bank import Head

log = logging.getLogger(__name__)

BACKBONE_FILE = "model.safetensors"
HEAD_DIR = "head"


class FinetuneModel(nn.Module):
    """``backbone`` (timm, ``num_classes=0``: pooled pre-logits (B, D)) + ``head`` (`Head`)."""

    def __init__(self, backbone: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalized pixels → (z (B, D) post-LN, logits (B, C))."""
        z = self.head.norm(self.backbone(x))
        return z, self.head.fc(z)


def head_from_run(
    run_dir: str, *, dim: int, class_names: tuple[str, ...], backbone_identity: dict[str, Any]
) -> Head:
    """The head of a stage-2 run folder, checked: width ``dim``, the same classes in the same
    order, and (when its store can be opened) a store written by this backbone and weights.

    Raises:
        InputError: naming the folder and what does not match.
    """
    from pipeline.heads.io import load_head

    head, config = load_head(run_dir)
    if tuple(config["class_names"]) != tuple(class_names):
        raise InputError(
            f"--init-head {run_dir}: its classes {config['class_names'][:4]}… are not DATA's "
            f"{list(class_names)[:4]}… (same names, same order); train it on a store of this DATA"
        )
    if head.dim != dim:
        raise InputError(
            f"--init-head {run_dir}: the head takes D={head.dim} features, the backbone gives "
            f"D={dim}; train the head on a store of this backbone"
        )
    url = (config.get("store") or {}).get("url")
    if url:
        from stores import open_store

        try:
            ident = open_store(url).identity
        except Exception as e:  # the store may be gone: the head file itself was checked
            log.info("--init-head %s: its store %s cannot be opened (%s)", run_dir, url, e)
        else:
            keys = ("backbone", "weights", "input_size")
            have = (ident.backbone, ident.weights, list(ident.data_config["input_size"]))
            wanted = tuple(backbone_identity[k] for k in keys)
            if have != wanted or ident.extra.get("features") or ident.extra.get("cache_at"):
                raise InputError(
                    f"--init-head {run_dir} was trained on {url} ({have[0]}, weights {have[1]}, "
                    f"input {have[2]}, {ident.extra.get('features', 'pooled')}), not pooled "
                    f"embeddings of {wanted[0]} (weights {wanted[1]}, input {wanted[2]}); give a "
                    "head trained on a store of this backbone"
                )
    return head


def probe_head(
    embed: Any, splits: dict[str, tuple[torch.Tensor, np.ndarray]], class_names: tuple[str, ...]
) -> tuple[Head, dict[str, Any]]:
    """A linear probe on frozen embeddings: stage 2's plain head (L-BFGS, λ picked on val).

    ``splits``: ``{"train": (X (N, D) float32, y (N,)), "val": ...}``. Returns the head and its
    validation metrics."""
    from pipeline.heads.features import FeatureSet
    from pipeline.heads.probe import ProbeSettings, run_probe

    features = FeatureSet.from_arrays(
        {k: (X.numpy(), y) for k, (X, y) in splits.items()}, class_names=class_names
    )
    report = run_probe(features, ProbeSettings(augs=("none",)))
    result = report.result
    return result.best_head(), dict(result.val[result.best_index])


def export_files(model: FinetuneModel, folder: Path, *, class_names, extra: dict) -> dict[str, str]:
    """Write ``model.safetensors`` (the backbone's float32 state dict, timm's names, no
    classifier) and ``head/`` (`pipeline.heads.io.save_head`) into ``folder``. Paths by kind."""
    from pipeline.heads.io import save_head, write_safetensors

    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.backbone.state_dict().items()
    }
    write_safetensors(
        folder / BACKBONE_FILE, state, metadata={"format": "pt", "carrot": json.dumps(extra)}
    )
    head = Head(model.head.dim, model.head.num_classes, eps=model.head.norm.eps)
    head.load_state_dict({k: v.detach().cpu() for k, v in model.head.state_dict().items()})
    save_head(head, folder / HEAD_DIR, class_names=class_names, extra={"finetune": extra})
    return {"backbone": str(folder / BACKBONE_FILE), "head": str(folder / HEAD_DIR)}
