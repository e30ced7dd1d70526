"""A partially frozen run's folder (``carrot train STORE --trainable-blocks N --out DIR``):
``top.safetensors`` (the trained blocks, norms and head, by parameter name) and ``top.json``
(the backbone to rebuild, the cache it was trained on, classes, settings, metrics).

The folder is self-contained: the backbone is rebuilt from ``top.json`` (random-init seed, hub
tag, or the checkpoint file, sha256-checked), not from the training store, so ``carrot predict``
runs it over any store cached at the same point by the same backbone and weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.heads.top import PartialTop, TopResult, TopSettings, backbone_config_of, cache_point

TOP_WEIGHTS, TOP_CONFIG = "top.safetensors", "top.json"
VERSION = 2  # 2: the backbone and the cache identity recorded (1: rebuilt from the store)
_RERUN = "re-run carrot train STORE --trainable-blocks N --out DIR"


def is_top_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a partially frozen run (its ``top.json``)."""
    return (Path(folder) / TOP_CONFIG).is_file()


def cache_identity(store: Any) -> dict[str, Any]:
    """What a cached row depends on: backbone, weights, input size, cache point, row shape."""
    ident = store.identity
    cached, shape = cache_point(store)
    return {
        "backbone": ident.backbone,
        "weights": dict(ident.weights),
        "input_size": list(ident.data_config["input_size"]),
        "cache_at": f"block:-{cached}",
        "row_shape": list(shape),
    }


def write_top_run(out_dir: str, result: TopResult, store: Any, settings: TopSettings) -> dict:
    """Publish the run folder (`pipeline.heads.io.publish_run`: all or nothing). Returns the
    file paths."""
    from pipeline.heads.io import publish_run, write_json, write_safetensors

    cfg = backbone_config_of(store, checkpoint=settings.checkpoint)
    checkpoint = str(Path(cfg.checkpoint).resolve()) if cfg.checkpoint else None
    config = {
        "kind": "carrot-top",
        "version": VERSION,
        "store": store.url,
        "store_key": store.key,
        "backbone": {
            "name": cfg.name,
            "pretrained": cfg.pretrained,
            "checkpoint": checkpoint,
            "seed": cfg.seed,
            "image_size": cfg.image_size,
        },
        "cache": cache_identity(store),
        "cached_blocks": cfg.cache_at,
        "class_names": list(store.class_names),
        "settings": dataclasses.asdict(settings) | {"checkpoint": checkpoint},
        "metrics": result.to_dict(),
    }

    def write(staging: Path) -> dict:
        write_safetensors(staging / TOP_WEIGHTS, result.state)
        write_json(staging / TOP_CONFIG, config)
        return {
            "weights": str(Path(out_dir) / TOP_WEIGHTS),
            "config": str(Path(out_dir) / TOP_CONFIG),
        }

    return publish_run(out_dir, write)


def read_top_config(run_dir: str | Path) -> dict[str, Any]:
    """``top.json`` of a run folder; `InputError` naming the folder when it is not one."""
    try:
        config = json.loads((Path(run_dir) / TOP_CONFIG).read_text())
        if config.get("kind") != "carrot-top" or config.get("version") not in (1, VERSION):
            raise ValueError(f"kind {config.get('kind')!r}, version {config.get('version')!r}")
        missing = [k for k in ("class_names", "settings", "cached_blocks") if k not in config]
        if missing or "blocks" not in config["settings"]:
            raise ValueError(f"missing {missing or ['settings.blocks']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{run_dir}: not a partially frozen run ({e}); {_RERUN}") from None
    return config


def load_top(run_dir: str | Path) -> PartialTop:
    """The trained top of a run folder, on the CPU in eval mode. `InputError` naming the folder
    when a file is missing or does not fit, or the checkpoint it was built on is gone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.embed.backbone import create_backbone

    config = read_top_config(run_dir)
    try:
        state = load_file(str(Path(run_dir) / TOP_WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(f"{run_dir}: not a partially frozen run ({e}); {_RERUN}") from None
    backbone = create_backbone(_backbone_config(config, run_dir))
    top = PartialTop(
        backbone.model,
        config["cached_blocks"],
        config["settings"]["blocks"],
        len(config["class_names"]),
    )
    params = dict(top.named_parameters())
    unfit = [n for n, t in state.items() if n not in params or params[n].shape != t.shape]
    if unfit:
        raise InputError(f"{run_dir}: tensors {sorted(unfit)[:3]} do not fit the model; {_RERUN}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return top.eval()


def _backbone_config(config: dict[str, Any], run_dir: str | Path):
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.weights import file_sha256

    if "backbone" not in config:  # version 1: rebuilt from the training store
        from stores import open_store

        store = open_store(config["store"])
        if store.key != config["store_key"]:
            raise InputError(f"{run_dir}: its store {config['store']} has changed since training")
        return backbone_config_of(store)
    b, weights = config["backbone"], config["cache"]["weights"]
    if b["checkpoint"]:
        try:
            ok = file_sha256(b["checkpoint"]) == weights.get("sha256")
        except (OSError, InputError):
            ok = False
        if not ok:
            raise InputError(
                f"{run_dir}: the checkpoint it was trained on, {b['checkpoint']}, is gone or "
                "has changed; put that file back"
            )
    return BackboneConfig(
        name=b["name"],
        pretrained=b["pretrained"],
        checkpoint=b["checkpoint"],
        seed=b["seed"],
        image_size=b["image_size"],
        device="cpu",
        cache_at=config["cached_blocks"],
    )


class TopClassifier(nn.Module):
    """A loaded top as a classifier of store rows: (B, prod(row shape)) flattened cached
    activations → (B, C) logits (what `pipeline.heads.predict.predict` runs)."""

    def __init__(self, top: PartialTop, row_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.top, self.row_shape = top, tuple(row_shape)
        self.num_classes = top.fc.out_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.top.fc(self.top.head_input(rows.view(-1, *self.row_shape)))

    @property
    def batch_rows(self) -> int:
        """Rows per forward pass: about 64 MiB of cached input (at most 8192)."""
        return max(1, min(8192, (64 << 20) // (4 * math.prod(self.row_shape))))


def check_top_fits(
    config: dict[str, Any], store: Any, *, run_dir: str | Path, allow_other_classes: bool
) -> bool:
    """Check a run's ``top.json`` against a store before predicting: the store must be cached
    at the same point by the same backbone and weights (else `InputError` with the embed command
    that would make one); then the classes, as for a head (`check_head_fits`). Returns whether
    the store's labels can be scored."""
    from pipeline.heads.predict import check_head_fits

    want = config.get("cache")
    if want is None:  # version 1
        from stores import open_store

        want = cache_identity(open_store(config["store"]))
    try:
        have = cache_identity(store)
    except InputError:
        have = None
    if have != want:
        size = want["input_size"][-1]
        raise InputError(
            f"--head {run_dir} runs over {want['cache_at']} activations of {want['backbone']} "
            f"({want['weights'].get('kind')} weights, {size} px) but {store.url} "
            + ("holds pooled embeddings" if have is None else f"holds {_describe(have)}")
            + f"; embed the data with carrot embed DATA --backbone {want['backbone']} "
            f"--image-size {size} --cache-at {want['cache_at']} (and the same weights)"
        )
    as_head = {
        "dim": math.prod(want["row_shape"]),
        "class_names": config["class_names"],
        "store": {"url": config["store"]},
    }
    return check_head_fits(
        as_head, store, head_dir=run_dir, allow_other_classes=allow_other_classes
    )


def _describe(cache: dict[str, Any]) -> str:
    return (
        f"{cache['cache_at']} activations of {cache['backbone']} ({cache['weights'].get('kind')} "
        f"weights, {cache['input_size'][-1]} px)"
    )
