"""What one fine-tuning run is: data, backbone, warm start, optimizer, schedule, augmentation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError

if TYPE_CHECKING:  # the CLI reads these defaults without importing torch and timm
    from pipeline.embed.backbone import BackboneConfig

# Settings a resumed run may change without changing what it computes (where it runs).
RESUMABLE_CHANGES = frozenset({"workers", "device"})


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything ``carrot finetune`` resolves into; checked here, once."""

    data: str  # DATA: folder, CUB/NABirds root, CSV manifest or sklearn:digits
    backbone: BackboneConfig  # timm model, weights, input size, device, precision
    init_head: str | None = None  # stage-2 run folder (carrot train --out); None: fit a probe
    epochs: int = 5
    batch_size: int = 32  # images per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # AdamW peak learning rate of the head and the top block
    layer_decay: float = 0.75  # lr × layer_decay^(depth − layer) below the top; 1 = off
    weight_decay: float = 0.05  # AdamW, on weights only (no norms, biases, tokens)
    warmup_epochs: float = 0.0  # linear warm-up, then cosine decay to 0, per optimizer step
    ema: float = 0.0  # decay of timm's ModelEmaV3 (e.g. 0.999); 0 = no EMA
    aug: str = "carrot"  # feature augmentation in the loop (pipeline.augment registry)
    train_aug: bool = True  # timm's training transform (random resized crop, flip, jitter)
    label_smoothing: float = 0.0
    clip_grad: float | None = None  # max gradient norm; None: no clipping
    workers: int | str = "auto"  # decode workers (pipeline.embed.extract.resolve_num_workers)
    val_fraction: float = 0.1  # split made when the data gives none (as carrot embed)
    test_fraction: float = 0.2
    seed: int = 0  # order, transforms, noise and dropout: all derived from (seed, epoch, step)

    def __post_init__(self) -> None:
        for option, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--accum-steps", self.accum_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{option} {value!r}: give a positive integer")
        _positive("--lr", self.lr)
        _in_range("--layer-decay", self.layer_decay, 0.0, 1.0, low_open=True)
        _in_range("--weight-decay", self.weight_decay, 0.0, math.inf)
        _in_range("--warmup-epochs", self.warmup_epochs, 0.0, float(self.epochs))
        _in_range("--ema", self.ema, 0.0, 1.0, high_open=True)
        _in_range("--label-smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        if self.clip_grad is not None:
            _positive("--clip-grad", self.clip_grad)
        if self.backbone.cache_at or self.backbone.features != "pooled":
            raise InputError(
                "carrot finetune trains on pooled embeddings: drop --cache-at / --features"
            )
        from pipeline.augment.registry import create_augmentation

        aug = create_augmentation(self.aug, num_classes=2)  # InputError for unknown names
        if aug.needs_fit:
            raise InputError(
                f"--aug {self.aug}: its default settings fit class statistics on cached features, "
                "which drift while the backbone trains; use carrot, gaussian, mixup or none"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, as recorded in checkpoints and the run summary."""
        return dataclasses.asdict(self)

    def resume_differences(self, recorded: dict[str, Any]) -> list[str]:
        """Names of the settings that differ from a checkpoint's ``recorded`` ones and would
        change what a resumed run computes."""
        now = self.to_dict()
        keys = set(now) | set(recorded)
        diff = [
            k for k in sorted(keys) if k not in RESUMABLE_CHANGES and now.get(k) != recorded.get(k)
        ]
        if "backbone" in diff:  # name the field, and let the device change
            a, b = dict(now["backbone"]), dict(recorded.get("backbone") or {})
            a.pop("device", None), b.pop("device", None)
            diff.remove("backbone")
            diff += [f"backbone.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return diff


def _positive(option: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise InputError(f"{option} {value!r}: give a positive number")


def _in_range(
    option: str,
    value: float,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and not math.isnan(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise InputError(f"{option} {value!r}: give a number in {lo}{low:g}, {high:g}{hi}")
