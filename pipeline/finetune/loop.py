"""The fine-tuning loop: warm start, epochs with CARROT in the loop, checkpoints, best export.

One optimizer step = ``accum_steps`` micro-batches of ``batch_size`` images. Per micro-batch:
``z, logits = model(x)`` under autocast (bf16 on CUDA where supported, else fp16 with a grad
scaler; fp32 on the CPU), the cross-entropy, plus the augmentation's extra rows (CARROT: noise
in the nuisance subspace of ``z``) through the head with their own cross-entropy weighted by
``aug_weight`` — their gradient reaches the backbone through ``z``. Then gradient clipping,
AdamW with layer-wise lr decay at the step's scheduled lr, and timm's EMA.

Every epoch ends with: validation top-1 (of the EMA weights when EMA is on), the best weights
exported to ``OUT/best/`` when val improved (one atomic folder switch), ``OUT/checkpoint.pt``
(atomic), ``OUT/history.json`` and the learning curves. Randomness — the epoch's order, each
image's crop, dropout and CARROT's noise — is seeded by ``(seed, epoch)``, so resuming from the
checkpoint of epoch e gives the weights and optimizer state of the uninterrupted run.
``OUT/summary.json`` (``"complete": true``) is written only when the last epoch is done.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.embed.backbone import create_backbone
from pipeline.embed.sources import resolve_source
from pipeline.errors import InputError
from pipeline.finetune.checkpoint import load_checkpoint, save_checkpoint
from pipeline.finetune.data import EpochOrder, SplitImages, epoch_seed, loader
from pipeline.finetune.model import FinetuneModel, export_files, head_from_run, probe_head
from pipeline.finetune.optim import create_optimizer, lr_at, set_lr
from pipeline.finetune.settings import FinetuneSettings

log = logging.getLogger(__name__)

BEST_DIR, HISTORY_FILE, SUMMARY_FILE = "best", "history.json", "summary.json"
CURVES_FILE = "learning_curves.png"
EpochHook = Callable[[dict[str, Any]], None]


def check_start(settings: FinetuneSettings, out: Path, *, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a new run), after the checks that need no model:
    a checkpoint is continued only with ``resume`` and the same settings, ``resume`` needs one,
    and ``init_head`` must be a saved head.

    Raises:
        InputError: naming --out, --resume or --init-head and the fix.
    """
    payload = load_checkpoint(out) if out.is_dir() else None
    if payload is not None and not resume:
        raise InputError(
            f"--out {out} holds a fine-tuning checkpoint (epoch {payload['epoch']} of "
            f"{payload['settings']['epochs']}): pass --resume to continue it, or give "
            "another --out"
        )
    if payload is None and resume:
        raise InputError(f"--resume: {out} has no checkpoint.pt; drop --resume to start")
    if payload is not None:
        diff = settings.resume_differences(payload["settings"])
        if diff:
            raise InputError(
                f"--resume: {out} was started with other settings ({', '.join(diff)}); "
                "repeat its command, or give another --out"
            )
    elif settings.init_head is not None:
        from pipeline.heads.io import read_head_config

        if not (Path(settings.init_head) / "head.safetensors").is_file():
            raise InputError(
                f"--init-head {settings.init_head} is not a saved head (no head.safetensors); "
                "give a folder written by carrot train --out"
            )
        read_head_config(settings.init_head)
    return payload


class Finetuner:
    """One fine-tuning run in ``out``: build (or resume) it, then `run_epoch` per epoch and
    `finish`. ``finetune`` does all three."""

    def __init__(self, settings: FinetuneSettings, out: str | Path, *, resume: bool = False):
        from pipeline.heads.io import check_out_dir

        self.settings, self.out = settings, check_out_dir(out)
        self.t0 = time.perf_counter()
        payload = check_start(settings, self.out, resume=resume)
        self._build_data()
        self._build_model(payload)

    # ------------------------------------------------------------------ setup
    def _build_data(self) -> None:
        s = self.settings
        self.source = resolve_source(
            s.data, val_fraction=s.val_fraction, test_fraction=s.test_fraction
        )
        if len(self.source.class_names) < 2:
            raise InputError(f"DATA {s.data!r} has one class; a classifier needs at least 2")
        self.rows = {k: self.source.indices(k) for k in ("train", "val", "test")}
        if len(self.rows["train"]) == 0:
            raise InputError(f"DATA {s.data!r} has no training images")

    def _build_model(self, payload: dict[str, Any] | None) -> None:
        s = self.settings
        self.backbone = create_backbone(s.backbone)  # weights checked and loaded; frozen
        self.device, self.precision = self.backbone.device, self.backbone.precision
        self.class_names = tuple(self.source.class_names)
        eval_tf = self.backbone.transform()  # timm's, for the model's data config
        train_tf = self.backbone.transform(train=True) if s.train_aug else eval_tf
        size = self.backbone.input_size
        self.train_set = SplitImages(
            self.source, self.rows["train"], train_tf, size, seed=s.seed if s.train_aug else None
        )
        self.eval_sets = {
            k: SplitImages(self.source, r, eval_tf, size) for k, r in self.rows.items() if len(r)
        }
        self.order = EpochOrder(len(self.train_set), s.seed)
        self.identity = identity = {
            "backbone": s.backbone.name,
            "weights": self.backbone.weights,
            "input_size": list(self.backbone.data_config["input_size"]),
        }
        self.warm_start: dict[str, Any] = {}
        if payload is None:
            head = self._warm_start_head(identity)
        else:
            from pipeline.heads.bank import Head

            head = Head(self.backbone.dim, len(self.class_names))
            self.warm_start = payload["warm_start"]
        self.model = FinetuneModel(self.backbone.model, head).to(self.device)
        self.model.requires_grad_(True).train()
        self.optimizer = create_optimizer(
            self.model, lr=s.lr, weight_decay=s.weight_decay, layer_decay=s.layer_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.ema = None
        if s.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=s.ema)
        from pipeline.augment.registry import create_augmentation

        self.aug = create_augmentation(s.aug, num_classes=len(self.class_names))
        micro = math.ceil(len(self.train_set) / s.batch_size)
        self.steps_per_epoch = math.ceil(micro / s.accum_steps)
        self.total_steps = self.steps_per_epoch * s.epochs
        self.warmup_steps = round(s.warmup_epochs * self.steps_per_epoch)
        self.epoch, self.step, self.history = 0, 0, []
        self.best: dict[str, Any] = {"epoch": None, "val_top1": -1.0}
        if payload is not None:
            self._restore(payload)
        elif "val" in self.eval_sets:  # the baseline every epoch is compared with
            self.warm_start["val_top1"] = self.evaluate("val", self.model)["top1"]

    def _warm_start_head(self, identity: dict[str, Any]):
        s = self.settings
        if s.init_head is not None:
            self.warm_start = {"kind": "head", "from": str(s.init_head)}
            return head_from_run(
                s.init_head,
                dim=self.backbone.dim,
                class_names=self.class_names,
                backbone_identity=identity,
            )
        t0 = time.perf_counter()
        splits = {k: self._embed(k) for k in ("train", "val") if k in self.eval_sets}
        head, val = probe_head(self.backbone, splits, self.class_names)
        self.warm_start = {
            "kind": "probe",
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.info("warm start: linear probe, val top-1 %s", val.get("accuracy"))
        return head

    def _embed(self, split: str) -> tuple[torch.Tensor, np.ndarray]:
        """Frozen pooled embeddings of ``split`` (eval transform) → (X (n, D), y (n,))."""
        xs, ys = [], []
        for x, y, ok in self._eval_loader(split):
            xs.append(self.backbone.forward(x[ok]).cpu())
            ys.append(y[ok].numpy())
        return torch.cat(xs), np.concatenate(ys)

    def _eval_loader(self, split: str):
        return loader(
            self.eval_sets[split],
            batch_size=max(64, self.settings.batch_size),
            workers=self.settings.workers,
            pin=self.device.type == "cuda",
        )

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["ema"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        self.history, self.best = list(payload["history"]), dict(payload["best"])
        log.info("resumed %s at epoch %d, step %d", self.out, self.epoch, self.step)

    # ------------------------------------------------------------------ one epoch
    @property
    def done(self) -> bool:
        return self.epoch >= self.settings.epochs

    def run_epoch(self) -> dict[str, Any]:
        """Train epoch ``self.epoch + 1``, evaluate, export if best, checkpoint. Its metrics."""
        s, epoch = self.settings, self.epoch
        t0 = time.perf_counter()
        self.train_set.set_epoch(epoch)
        self.order.set_epoch(epoch)
        batches = loader(
            self.train_set,
            batch_size=s.batch_size,
            workers=s.workers,
            sampler=self.order,
            pin=self.device.type == "cuda",
        )
        cuda = [self.device] if self.device.type == "cuda" else []
        totals = _Totals()
        self.model.train()
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(epoch_seed(s.seed, epoch, 1))  # dropout, drop-path
            noise = torch.Generator(device=self.device).manual_seed(epoch_seed(s.seed, epoch, 2))
            n_micro = len(batches)
            for i, (x, y, ok) in enumerate(batches):
                first = i - i % s.accum_steps
                group = min(s.accum_steps, n_micro - first)  # the last group may be shorter
                self._micro_step(x[ok], y[ok], noise, totals, scale=1.0 / group)
                totals.skipped += int((~ok).sum())
                if i - first == group - 1:
                    self._optimizer_step()
        train_seconds = time.perf_counter() - t0
        val = self.evaluate("val") if "val" in self.eval_sets else {}
        self.epoch = epoch + 1
        metrics = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.optimizer.param_groups[-1]["lr"],
            **totals.means(),
            "val_top1": val.get("top1"),
            "val_balanced_accuracy": val.get("balanced_accuracy"),
            "val_loss": val.get("loss"),
            "train_seconds": round(train_seconds, 3),
            "images_per_s": round(totals.images / max(train_seconds, 1e-9), 2),
        }
        self.history.append(metrics)
        improved = (val.get("top1") if val else 0.0) > self.best["val_top1"] or not val
        if improved:
            self._export_best(metrics)
        self._save()
        log.info("epoch %d/%d: %s", self.epoch, s.epochs, metrics)
        return metrics

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """One optimizer step on one micro-batch ``x`` (B, 3, H, W), ``y`` (B,): what
        ``benchmarks.finetune`` times against a bare timm loop."""
        self._micro_step(x, y, generator, _Totals(), scale=1.0)
        self._optimizer_step()

    def _micro_step(self, x, y, noise, totals: _Totals, *, scale: float) -> None:
        if not len(y):
            return
        s = self.settings
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            z, logits = self.model(x)
        z, logits = z.float(), logits.float()
        loss = F.cross_entropy(logits, y, label_smoothing=s.label_smoothing)
        aug_loss = None
        if s.aug != "none":
            weight = self.model.head.fc.weight
            extra = self.aug(z, y, logits.detach(), weight.detach().float(), generator=noise)
            if len(extra):
                aug_logits = F.linear(extra.z, weight.float(), self.model.head.fc.bias.float())
                target = extra.y_soft if extra.y_soft is not None else extra.y
                aug_loss = F.cross_entropy(aug_logits, target)
                loss = loss + self.aug.aug_weight * aug_loss
                totals.add_aug(extra, aug_logits)
        if self.scaler is not None:
            self.scaler.scale(loss * scale).backward()
        else:
            (loss * scale).backward()
        totals.add(loss, logits, y, aug_loss)

    def _optimizer_step(self) -> None:
        s = self.settings
        set_lr(
            self.optimizer,
            lr_at(self.step, peak=s.lr, total=self.total_steps, warmup=self.warmup_steps),
        )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if s.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    # ------------------------------------------------------------------ evaluation, files
    def eval_model(self) -> FinetuneModel:
        """What is evaluated and exported: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model  # type: ignore[return-value]

    def evaluate(self, split: str, model: FinetuneModel | None = None) -> dict[str, float]:
        """Top-1, balanced accuracy and mean cross-entropy on ``split`` (eval transform, no
        gradient)."""
        model = model or self.eval_model()
        was_training = model.training
        model.eval()
        loss, preds, labels = 0.0, [], []
        with torch.no_grad():
            for x, y, ok in self._eval_loader(split):
                x, y = x[ok].to(self.device), y[ok].to(self.device)
                if not len(y):
                    continue
                with self._autocast():
                    _, logits = model(x)
                logits = logits.float()
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                preds.append(logits.argmax(-1).cpu().numpy())
                labels.append(y.cpu().numpy())
        model.train(was_training)
        if not labels:
            return {"top1": 0.0, "balanced_accuracy": 0.0, "loss": math.nan, "n": 0}
        pred, label = np.concatenate(preds), np.concatenate(labels)
        recalls = [float((pred[label == c] == c).mean()) for c in np.unique(label)]
        return {
            "top1": float((pred == label).mean()),
            "balanced_accuracy": float(np.mean(recalls)),
            "loss": loss / len(label),
            "n": len(label),
        }

    def _export_best(self, metrics: dict[str, Any]) -> None:
        from pipeline.heads.io import publish_run, write_json

        info = {"epoch": metrics["epoch"], "step": metrics["step"], "val_top1": metrics["val_top1"]}
        extra = {**info, **self.identity, "data": self.settings.data}

        def write(staging: Path) -> dict[str, str]:
            files = export_files(
                self.eval_model(), staging, class_names=self.class_names, extra=extra
            )
            write_json(staging / "best.json", extra)
            return files

        publish_run(self.out / BEST_DIR, write)
        self.best = {"epoch": metrics["epoch"], "val_top1": metrics["val_top1"] or 0.0}

    def _save(self) -> None:
        from pipeline.heads.io import write_json

        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            self.out,
            {
                "settings": self.settings.to_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "history": self.history,
                "best": self.best,
                "warm_start": self.warm_start,
            },
        )
        write_json(self.out / HISTORY_FILE, self.history)
        _plot(self.history, self.out / CURVES_FILE)

    def finish(self) -> dict[str, Any]:
        """Test top-1 of the exported best weights; ``summary.json`` (complete). The summary."""
        from pipeline.finetune.model import BACKBONE_FILE, HEAD_DIR
        from pipeline.heads.io import write_json

        best_dir = self.out / BEST_DIR
        test = None
        if "test" in self.eval_sets:
            test = self.evaluate("test", self.load_best()).get("top1")
        summary = {
            "complete": True,
            "out": str(self.out),
            "epochs": self.epoch,
            "steps": self.step,
            "best_epoch": self.best["epoch"],
            "val_top1": self.best["val_top1"] if "val" in self.eval_sets else None,
            "test_top1": test,
            "warm_start": self.warm_start,
            "files": {
                "backbone": str(best_dir / BACKBONE_FILE),
                "head": str(best_dir / HEAD_DIR),
                "checkpoint": str(self.out / "checkpoint.pt"),
                "history": str(self.out / HISTORY_FILE),
            },
            "history": self.history,
            "settings": self.settings.to_dict(),
            "seconds": round(time.perf_counter() - self.t0, 2),
        }
        write_json(self.out / SUMMARY_FILE, summary)
        return summary

    def load_best(self) -> FinetuneModel:
        """A copy of the model holding the exported best weights (from ``OUT/best/``)."""
        import copy

        from safetensors.torch import load_file

        from pipeline.finetune.model import BACKBONE_FILE, HEAD_DIR
        from pipeline.heads.io import load_head

        model = copy.deepcopy(self.eval_model())
        model.backbone.load_state_dict(load_file(str(self.out / BEST_DIR / BACKBONE_FILE)))
        head, _ = load_head(self.out / BEST_DIR / HEAD_DIR)
        model.head.load_state_dict(head.state_dict())
        return model.to(self.device).eval()


class _Totals:
    """Sums over an epoch's micro-batches → per-image means and CARROT diagnostics."""

    def __init__(self) -> None:
        self.images = self.correct = self.skipped = self.aug_rows = 0
        self.loss = self.aug_loss = self.violations = 0.0
        self.diag: dict[str, list[float]] = {}

    def add(self, loss, logits, y, aug_loss) -> None:
        n = len(y)
        self.images += n
        self.loss += float(loss.detach()) * n
        self.correct += int((logits.detach().argmax(-1) == y).sum())
        if aug_loss is not None:
            self.aug_loss += float(aug_loss.detach()) * n

    def add_aug(self, extra, aug_logits) -> None:
        from pipeline.augment.carrot import violation_rate

        m = len(extra)
        self.aug_rows += m
        self.violations += float(violation_rate(aug_logits, extra.y, extra.gamma)) * m
        for key, value in (extra.diagnostics or {}).items():
            if (
                isinstance(value, int | float | torch.Tensor)
                and torch.as_tensor(value).numel() == 1
            ):
                self.diag.setdefault(key, []).append(float(value))

    def means(self) -> dict[str, Any]:
        n = max(self.images, 1)
        out: dict[str, Any] = {
            "train_loss": self.loss / n,
            "train_top1": self.correct / n,
            "images": self.images,
            "skipped_images": self.skipped,
            "aug_rows": self.aug_rows,
        }
        if self.aug_rows:
            out["aug_loss"] = self.aug_loss / n
            out["violation_rate"] = self.violations / self.aug_rows
            out["diagnostics"] = {k: float(np.mean(v)) for k, v in sorted(self.diag.items())}
        return out


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    from pipeline.plots import plot_learning_curves

    curves = {
        "train_loss": [[h["train_loss"]] for h in history],
        "val_balanced_accuracy": [
            [math.nan if h["val_balanced_accuracy"] is None else h["val_balanced_accuracy"]]
            for h in history
        ],
    }
    plot_learning_curves(curves, path, best_index=0, labels=["fine-tune"])


def finetune(
    settings: FinetuneSettings,
    out: str | Path,
    *,
    resume: bool = False,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run to its last epoch; the summary (`Finetuner.finish`).
    ``on_epoch(metrics)`` is called after each epoch's checkpoint is written."""
    tuner = Finetuner(settings, out, resume=resume)
    while not tuner.done:
        metrics = tuner.run_epoch()
        if on_epoch is not None:
            on_epoch(metrics)
    return tuner.finish()
