"""``carrot finetune DATA --backbone NAME``: end-to-end fine-tuning with CARROT in the loop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli_args import (
    add_weights_options,
    checked_checkpoint,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from pipeline.finetune.settings import FinetuneSettings

_D = FinetuneSettings.__dataclass_fields__  # the defaults live in FinetuneSettings only


def _default(name: str):
    return _D[name].default


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a timm backbone + head end to end (CARROT in the loop), resumable",
    )
    p.add_argument("data", metavar="DATA", help="as carrot embed: folder, CUB root, CSV, sklearn:")
    p.add_argument("--backbone", required=True, metavar="NAME", help="timm model name")
    add_weights_options(p)
    p.add_argument(
        "--init-head",
        metavar="DIR",
        help="warm start from a carrot train run folder (default: fit a linear probe first)",
    )
    p.add_argument("--epochs", type=positive_int, default=_default("epochs"), metavar="E")
    p.add_argument("--batch-size", type=positive_int, default=_default("batch_size"), metavar="N")
    p.add_argument(
        "--accum-steps",
        type=positive_int,
        default=_default("accum_steps"),
        metavar="K",
        help="micro-batches per optimizer step (effective batch N×K)",
    )
    p.add_argument("--lr", type=positive_float, default=_default("lr"), help="peak AdamW lr")
    p.add_argument(
        "--layer-decay",
        type=positive_float,
        default=_default("layer_decay"),
        help="layer-wise lr decay per block below the top (1 = off)",
    )
    p.add_argument("--weight-decay", type=nonneg_float, default=_default("weight_decay"))
    p.add_argument("--warmup-epochs", type=nonneg_float, default=_default("warmup_epochs"))
    p.add_argument(
        "--ema", type=nonneg_float, default=_default("ema"), help="EMA decay, e.g. 0.999 (0 = off)"
    )
    p.add_argument(
        "--aug",
        default=_default("aug"),
        help="feature augmentation in the loop: carrot (default) | none | gaussian | mixup",
    )
    p.add_argument(
        "--no-train-aug",
        action="store_true",
        help="no image augmentation (default: timm's training transform)",
    )
    p.add_argument("--label-smoothing", type=nonneg_float, default=_default("label_smoothing"))
    p.add_argument("--clip-grad", type=positive_float, metavar="NORM", help="max gradient norm")
    p.add_argument("--image-size", type=positive_int, metavar="N", help="override input size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 on CUDA where supported, else fp16 with a grad scaler; fp32 on CPU",
    )
    p.add_argument("--workers", type=nonneg_int, metavar="N", help="decode workers (default auto)")
    p.add_argument("--val-fraction", type=fraction, default=_default("val_fraction"), metavar="F")
    p.add_argument("--test-fraction", type=fraction, default=_default("test_fraction"), metavar="F")
    p.add_argument(
        "--out", metavar="DIR", help="run folder (default $CARROT_HOME/finetune/DATA-NAME)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    p.add_argument(
        "--reembed",
        action="store_true",
        help="afterwards embed DATA with the fine-tuned backbone into a new store (--root)",
    )
    p.add_argument("--root", metavar="DIR|URL", help="store root of --reembed")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(run=run_finetune)


def finetune_settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    """The checked `FinetuneSettings` of the command line (`InputError` naming the option)."""
    from pipeline.embed.backbone import BackboneConfig

    return FinetuneSettings(
        data=args.data,
        backbone=BackboneConfig(
            name=args.backbone,
            pretrained=args.pretrained,
            checkpoint=checked_checkpoint(args.checkpoint),
            seed=args.seed,
            image_size=args.image_size,
            device=args.device,
            precision=args.precision,
        ),
        init_head=args.init_head,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accum_steps=args.accum_steps,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        ema=args.ema,
        aug=args.aug,
        train_aug=not args.no_train_aug,
        label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad,
        workers="auto" if args.workers is None else args.workers,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )


def default_out(data: str, backbone: str) -> str:
    """``$CARROT_HOME/finetune/<data name>-<backbone>``."""
    from pipeline.home import carrot_home

    name = data.split(":", 1)[1] if data.lower().startswith("sklearn:") else Path(data).name
    return str(carrot_home() / "finetune" / f"{name or 'data'}-{backbone}")


def run_finetune(args: argparse.Namespace) -> int:
    """Check the options (and the backbone name, device, weights), then run the flow."""
    from flows.cli_train import percent
    from flows.finetune import finetune_flow
    from flows.runtime import flow_settings
    from pipeline.embed.backbone import check_weights, resolve_device
    from pipeline.embed.run import default_root
    from pipeline.finetune.loop import check_start
    from pipeline.heads.io import check_out_dir

    settings = finetune_settings_from_args(args)
    check_weights(settings.backbone)  # the name, and weights that cannot be used
    resolve_device(settings.backbone.device)
    out = args.out or default_out(args.data, args.backbone)
    check_start(settings, check_out_dir(out), resume=args.resume)
    root = (args.root or default_root()) if args.reembed else None
    with flow_settings():
        summary = finetune_flow(settings, out, resume=args.resume, reembed_root=root)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, default=str))
        return 0
    for h in summary["history"]:
        carrot = f"  CARROT rows {h['aug_rows']}, violations {h.get('violation_rate', 0):.3f}"
        print(
            f"epoch {h['epoch']:>3}  loss {h['train_loss']:.4f}  val top-1 "
            f"{percent(h['val_top1'])}  {h['images_per_s']:.1f} img/s"
            + (carrot if h["aug_rows"] else "")
        )
    print(
        f"best     epoch {summary['best_epoch']}: val {percent(summary['val_top1'])}  test "
        f"{percent(summary['test_top1'])}  (warm start: {summary['warm_start'].get('kind')}, "
        f"val {percent(summary['warm_start'].get('val_top1'))})"
    )
    print(
        f"wrote    {summary['files']['backbone']} (carrot embed --checkpoint), {summary['files']['head']}"
    )
    if "store" in summary:
        print(f"store    {summary['store']['store']}")
    return 0
