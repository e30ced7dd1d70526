"""The frozen timm backbone of stage 1: creation, weights, preprocessing and a batched forward.

``create_backbone(cfg)`` builds ``timm.create_model(name, num_classes=0)`` (the pre-logits
embedding) with its weights (hub, a local checkpoint file — both loaded by timm itself — or a
seeded random init), freezes it and measures the embedding width with a dummy forward.
``describe_backbone(cfg)`` gives the same identity (data config, weights, precision) without loading any weights, for cache look-ups;
``check_weights(cfg)`` fails fast on weights that cannot be used, without building the model.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from PIL import Image

from pipeline.embed.cache_point import cached_activations, check_cache_model
from pipeline.embed.feature_modes import check_model, last_blocks
from pipeline.embed.feature_modes import embed as embed_features
from pipeline.embed.seeding import seeded_global_rngs
from pipeline.embed.weights import (
    check_checkpoint_fits,
    checkpoint_load_error,
    checkpoint_overlay,
    ensure_hub_weights_available,
    file_sha256,
    load_checkpoint_file,
    pretrained_cfg,
)
from pipeline.errors import InputError

__all__ = [
    "PRECISIONS",
    "Backbone",
    "BackboneConfig",
    "check_weights",
    "create_backbone",
    "describe_backbone",
    "resolve_device",
    "resolve_precision",
    "validate_backbone_name",
]

logger = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BackboneConfig:
    """Which timm model, with which weights, on which device."""

    name: str  # timm model name, optionally with a pretrained tag ("resnet18.a1_in1k")
    pretrained: bool = False  # hub weights (needs network or the local HF cache)
    checkpoint: str | None = None  # local .safetensors or .pth/.pt file (wins over pretrained)
    seed: int = 0  # random-init seed (recorded in the identity)
    image_size: int | None = None  # override the model's input size (square, pixels)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = (
        "auto"  # auto (bf16 on CUDA if supported else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    )
    features: str = "pooled"  # pooled | cls+avgpool | last:N (pipeline.embed.feature_modes)
    cache_at: int = 0  # N > 0: store the tokens entering the last N blocks (cache_point)

    def __post_init__(self) -> None:
        last_blocks(self.features)  # InputError naming --features
        if isinstance(self.cache_at, bool) or not isinstance(self.cache_at, int):
            raise InputError(f"--cache-at {self.cache_at!r}: use block:-N")
        if self.cache_at < 0:
            raise InputError(f"--cache-at block:{self.cache_at}: use block:-N with N ≥ 1")
        if self.cache_at and self.features != "pooled":
            raise InputError(
                f"--cache-at block:-{self.cache_at} stores tokens; it does not take --features "
                f"{self.features} (drop one of the two)"
            )


def model_output(model: torch.nn.Module, x: torch.Tensor, cfg: BackboneConfig) -> torch.Tensor:
    """What ``cfg`` stores per image, unflattened: (B, D) features of ``cfg.features``, or with
    ``cfg.cache_at`` the (B, T, D) tokens entering the last ``cache_at`` blocks."""
    if cfg.cache_at:
        return cached_activations(model, x, cfg.cache_at)
    return embed_features(model, x, cfg.features)


def check_outputs(model: torch.nn.Module, cfg: BackboneConfig) -> None:
    """`InputError` unless ``model`` can give what ``cfg`` asks (token features, a cache point)."""
    check_model(model, cfg.features, cfg.name)
    if cfg.cache_at:
        check_cache_model(model, cfg.cache_at, cfg.name)


@dataclass
class Backbone:
    """A frozen backbone ready for inference."""

    model: torch.nn.Module  # eval(), requires_grad False, channels_last on CUDA
    config: BackboneConfig
    device: torch.device
    dim: int  # embedding width D, measured by a dummy forward
    data_config: dict[str, Any]  # resolved timm data config (JSON-serializable)
    weights: dict[str, Any]  # identity of the weights (see describe_backbone)
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        shape = (1, -1, 1, 1)
        self._mean = torch.tensor(self.data_config["mean"], dtype=torch.float32).view(shape)
        self._std = torch.tensor(self.data_config["std"], dtype=torch.float32).view(shape)
        self._mean, self._std = self._mean.to(self.device), self._std.to(self.device)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(3, H, W) the transform produces."""
        c, h, w = self.data_config["input_size"]
        return int(c), int(h), int(w)

    def transform(
        self, *, train: bool = False, normalize: bool = True
    ) -> Callable[[Image.Image], torch.Tensor]:
        """timm's preprocessing for this model: RGB PIL image → (3, H, W) tensor.

        ``normalize=True``: float32, mean/std normalized (the usual timm transform).
        ``normalize=False``: uint8 pixels; :meth:`forward` normalizes them on the device, which
        moves 4× fewer bytes and keeps the float work off the decoding workers.
        ``train=True``: timm's training augmentation (random resized crop, flip, colour jitter),
        drawing from Python's ``random`` and torch's global RNG (seed them around each call).
        """
        return timm.data.create_transform(
            **self.data_config, is_training=train, use_prefetcher=not normalize
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch: (B, 3, H, W) float32 normalized or uint8 pixels → (B, D) float32 (a
        token cache: (B, T·D), the tokens flattened).

        Runs under ``torch.inference_mode`` and autocast per the resolved precision; returns
        the embeddings on :attr:`device`.
        """
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:
                # Same arithmetic as ToTensor + Normalize, so results match the float path.
                x = x.float().div_(255.0).sub_(self._mean).div_(self._std)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            amp = _AMP_DTYPES[self.precision]
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                y = model_output(self.model, x, self.config)
            return y.flatten(1).float()

    __call__ = forward


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when available else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` checked."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(
            f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA device(s)); "
            "use cuda:0 .. cuda:N-1"
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA when supported else fp16; fp32 on CPU. Others checked."""
    p = (precision or "auto").strip().lower()
    if p not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if p == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    return p


def describe_backbone(cfg: BackboneConfig) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(data_config, weights, precision) of ``cfg`` without loading weights or using the device.

    ``weights`` is one of ``{"kind": "hub", "tag": "arch.tag", "hf_hub_id": ...}``,
    ``{"kind": "checkpoint", "sha256": ..., "file": basename}``, ``{"kind": "random", "seed": s}``.
    The model is built on the meta device (no memory, no init cost).
    """
    validate_backbone_name(cfg.name)
    device = resolve_device(cfg.device)
    with torch.device("meta"):
        model = _build_model(cfg, pretrained=False)
    check_outputs(model, cfg)
    return (
        _data_config(model, cfg.image_size),
        _weights_identity(cfg),
        resolve_precision(cfg.precision, device),
    )


def check_weights(cfg: BackboneConfig) -> None:
    """Fail fast on weights that cannot be used, before any work or server starts.

    A checkpoint is read (tensors only; pickled code refused) and loaded by timm into the model
    built on the meta device — no memory, no init: missing keys, shape mismatches and NaN/Inf
    tensors are caught here (:func:`~pipeline.embed.weights.check_checkpoint_fits`). Hub weights
    must be in the local cache or downloadable. A random init needs nothing (cheap).

    Raises:
        InputError: naming the checkpoint (and tensor) or ``--checkpoint``.
    """
    validate_backbone_name(cfg.name)
    if cfg.checkpoint is not None:
        _check_checkpoint(cfg, cfg.checkpoint)
    elif cfg.pretrained:
        ensure_hub_weights_available(cfg.name)


def _check_checkpoint(cfg: BackboneConfig, path: str) -> None:
    """Read ``path`` and check that timm loads it into ``cfg``'s model (on the meta device)."""
    state_dict = load_checkpoint_file(path)

    def build(overlay: dict[str, Any]) -> torch.nn.Module:
        return _build_model(cfg, pretrained=True, pretrained_cfg_overlay=overlay)

    check_checkpoint_fits(build, state_dict, path)


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build, load, freeze and place the backbone of ``cfg``.

    Raises:
        InputError: unknown model or tag, bad device/precision, unusable checkpoint, or hub
            weights that cannot be fetched (offline and not in the local cache).
    """
    validate_backbone_name(cfg.name)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_hub = cfg.pretrained and cfg.checkpoint is None
    overlay: dict[str, Any] | None = None
    if cfg.checkpoint is not None:
        if cfg.pretrained:
            logger.info("both pretrained and checkpoint given: loading %s", cfg.checkpoint)
        _check_checkpoint(cfg, cfg.checkpoint)  # one-line errors before any real weights load
        overlay = checkpoint_overlay(cfg.checkpoint)
    elif use_hub:
        ensure_hub_weights_available(cfg.name)
    try:
        # random init (and anything timm leaves random) is seeded; the caller's RNG is restored
        with seeded_global_rngs(cfg.seed):
            model = _build_model(
                cfg, pretrained=overlay is not None or use_hub, pretrained_cfg_overlay=overlay
            )
    except Exception as e:
        if overlay is not None:  # checked above: the file changed, or timm read it otherwise
            raise checkpoint_load_error(cfg.checkpoint, e) from e  # type: ignore[arg-type]
        if use_hub and isinstance(e, RuntimeError):
            raise InputError(
                f"cannot load pretrained weights for {cfg.name!r}: {e}. Pass --checkpoint FILE "
                "with a local .safetensors/.pth instead"
            ) from None
        raise
    check_outputs(model, cfg)
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model = model.to(device)
    backbone = Backbone(
        model=model,
        config=cfg,
        device=device,
        dim=0,
        data_config=_data_config(model, cfg.image_size),
        weights=_weights_identity(cfg, model=model),
        precision=precision,
    )
    dummy = torch.zeros((1, *backbone.input_size), dtype=torch.float32)
    backbone.dim = int(backbone.forward(dummy).shape[-1])  # (1, D); not num_features
    logger.info(
        "backbone %s on %s (%s): D=%d, input %s, weights %s",
        cfg.name,
        device,
        precision,
        backbone.dim,
        backbone.input_size,
        backbone.weights,
    )
    return backbone


def row_shape(cfg: BackboneConfig) -> tuple[int, ...]:
    """Shape of what ``cfg`` stores per image before flattening — ``(D,)``, or ``(T, D)`` for a
    token cache — from a forward pass on the meta device (no memory, no weights). Falls back to
    building the backbone where a model does not run on the meta device."""
    try:
        with torch.device("meta"):
            model = _build_model(cfg, pretrained=False).eval()
            check_outputs(model, cfg)
            _, h, w = _data_config(model, cfg.image_size)["input_size"]
            x = torch.zeros(1, 3, int(h), int(w))
            return tuple(int(v) for v in model_output(model, x, cfg).shape[1:])
    except InputError:
        raise
    except Exception as e:  # an op without a meta kernel: measure it for real
        logger.debug("meta forward of %s failed (%s); building it", cfg.name, e)
        backbone = create_backbone(cfg)
        x = torch.zeros((1, *backbone.input_size), dtype=torch.float32, device=backbone.device)
        with torch.inference_mode():
            return tuple(int(v) for v in model_output(backbone.model, x, cfg).shape[1:])


def embedding_dim(cfg: BackboneConfig) -> int:
    """Width of a store row for ``cfg`` (D, or T·D for a token cache), from `row_shape`; for a
    coordinator that preallocates a store its workers fill."""
    return math.prod(row_shape(cfg))


# --------------------------------------------------------------------------- model and config


def validate_backbone_name(name: str) -> None:
    """Raise InputError, naming close matches, when timm does not know ``name`` or its
    pretrained tag. Cheap (no model is built): for failing fast at the command line."""
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        candidates = timm.list_models()
        close = difflib.get_close_matches(arch, candidates, n=5, cutoff=0.6)
        close += [m for m in timm.list_models(f"*{arch}*")[:5] if m not in close]
        hint = f"; did you mean {', '.join(close[:5])}?" if close else ""
        raise InputError(
            f"unknown timm model {name!r}{hint} (list them with timm.list_models('*{arch}*'))"
        )
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = timm.list_pretrained(f"{arch}.*")
            raise InputError(
                f"unknown pretrained tag in {name!r}; known: {', '.join(tags[:8]) or 'none'}"
            ) from None


def _build_model(
    cfg: BackboneConfig, *, pretrained: bool, pretrained_cfg_overlay: dict[str, Any] | None = None
) -> torch.nn.Module:
    """``timm.create_model(name, num_classes=0)``; passes ``img_size`` to models that take it.

    With ``pretrained``, timm loads the weights ``pretrained_cfg_overlay`` points at (a local
    ``file`` or an in-memory ``state_dict``), or else the hub's, through the model's own
    checkpoint filter.
    """
    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0}
    if pretrained_cfg_overlay is not None:
        kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
    if cfg.image_size is not None:
        if cfg.image_size < 8:
            raise InputError(f"image_size={cfg.image_size} is too small; use e.g. 224")
        if _takes_img_size(cfg.name, cfg.image_size):
            kwargs["img_size"] = cfg.image_size
    return timm.create_model(cfg.name, **kwargs)


@functools.lru_cache(maxsize=64)
def _takes_img_size(name: str, image_size: int) -> bool:
    """Whether the architecture takes ``img_size`` (CNNs do not), asked without weights on the
    meta device, so that a TypeError while loading a checkpoint is never mistaken for a no."""
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError:
        return False
    return True


def _data_config(model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    """The model's own timm data config, ``input_size`` overridden; tuples → lists."""
    data_config = dict(timm.data.resolve_model_data_config(model))
    if image_size is not None:
        data_config["input_size"] = (3, int(image_size), int(image_size))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def _weights_identity(
    cfg: BackboneConfig, *, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    if cfg.checkpoint is not None:
        return {
            "kind": "checkpoint",
            "sha256": file_sha256(cfg.checkpoint),
            "file": Path(cfg.checkpoint).name,
        }
    if cfg.pretrained:
        pcfg = getattr(model, "pretrained_cfg", None) or pretrained_cfg(cfg.name)
        tag = f"{pcfg.get('architecture')}.{pcfg.get('tag')}" if pcfg.get("tag") else cfg.name
        return {
            "kind": "hub",
            "tag": tag,
            "hf_hub_id": pcfg.get("hf_hub_id") or pcfg.get("url") or None,
        }
    return {"kind": "random", "seed": int(cfg.seed)}
