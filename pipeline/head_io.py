"""Save and load a trained head (``head.safetensors`` + ``config.json``), and write a run's
output folder."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import InputError
from pipeline.heads import LN_EPS, Head, HeadSpec

if TYPE_CHECKING:
    from pipeline.train import TrainResult

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "config.json"

# The head does its own normalization; features go in exactly as the store holds them.
FEATURE_NORMALIZATION = {
    "input": "raw store features, float32, no external normalization",
    "head": "LayerNorm over the feature dimension (affine), then Linear without bias",
    "layernorm_eps": LN_EPS,
}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_head(
    head: Head,
    out_dir: str | Path,
    *,
    class_names: Sequence[str],
    spec: HeadSpec | None = None,
    store_key: str | None = None,
    store_url: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``head.safetensors`` and ``config.json`` (D, C, class names, spec, store, feature
    normalization) into ``out_dir``; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(class_names) != head.num_classes:
        raise InputError(
            f"{len(class_names)} class names for a head with {head.num_classes} classes"
        )
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    os.replace(tmp, out / WEIGHTS_FILE)
    config = {
        "format_version": FORMAT_VERSION,
        "dim": head.dim,
        "num_classes": head.num_classes,
        "class_names": list(class_names),
        "spec": spec.to_dict() if spec is not None else None,
        "store": {"key": store_key, "url": store_url},
        "feature_normalization": FEATURE_NORMALIZATION,
        **(extra or {}),
    }
    _write_json(out / CONFIG_FILE, config)
    return out


def load_head(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[Head, dict[str, Any]]:
    """Load a head written by `save_head` → ``(head in eval mode, config dict)``."""
    p = Path(path)
    cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(
            f"{p} is not a saved head: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it"
        )
    config = json.loads(cfg_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{cfg_path} has format_version {config.get('format_version')}; this code reads "
            f"{FORMAT_VERSION}"
        )
    eps = float(config.get("feature_normalization", {}).get("layernorm_eps", LN_EPS))
    head = Head(int(config["dim"]), int(config["num_classes"]), eps=eps)
    head.load_state_dict(load_file(str(w_path)))
    return head.to(device).eval(), config


def write_outputs(
    result: TrainResult,
    out_dir: str | Path,
    *,
    ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    store_key: str | None = None,
    store_url: str | None = None,
) -> dict[str, Path]:
    """Write a run's folder: head.safetensors, config.json, metrics.json, predictions.csv
    (test split), learning_curves.png, confusion.png. Returns name → path."""
    from pipeline.metrics import confusion_matrix
    from pipeline.plots import plot_confusion, plot_learning_curves
    from pipeline.predict import write_predictions_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else list(result.class_names)
    head = result.best_head()
    save_head(
        head,
        out,
        class_names=names,
        spec=result.best_spec,
        store_key=store_key,
        store_url=store_url,
        extra={"val": result.val[result.best_index], "train_config": _config_dict(result)},
    )
    paths = {"head": out / WEIGHTS_FILE, "config": out / CONFIG_FILE}
    metrics = result.summary()
    if result.test_probs is not None and result.test_labels is not None:
        pred = result.test_probs.argmax(axis=1)
        cm = confusion_matrix(result.test_labels, pred, num_classes=len(names))
        metrics["test_confusion"] = cm.tolist()
        paths["predictions"] = write_predictions_csv(
            out / "predictions.csv",
            probs=result.test_probs,
            class_names=names,
            ids=ids if ids is not None else result.test_ids,
            labels=result.test_labels,
        )
        paths["confusion"] = plot_confusion(cm, out / "confusion.png", class_names=names)
    _write_json(out / "metrics.json", metrics)
    paths["metrics"] = out / "metrics.json"
    paths["learning_curves"] = plot_learning_curves(
        result.curves,
        out / "learning_curves.png",
        best_index=result.best_index,
        labels=[s.name for s in result.specs],
    )
    logger.info("wrote outputs to %s", out)
    return paths


def _config_dict(result: TrainResult) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(result.config)
