"""``carrot train`` and ``carrot predict``: argument parsing and the printed summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.cli_args import (
    fraction,
    nonneg_float,
    nonneg_floats,
    nonneg_int,
    positive_floats,
    positive_int,
    threads_or_auto,
)
from pipeline.defaults import (
    DEFAULT_AUGS,
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    OPTIMIZERS,
    TrainConfig,
)

_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # every option's help shows its default
_TRAIN = TrainConfig()  # the training defaults the options show


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="stage 2: train a bank of LayerNorm+Linear heads over STORE",
        description="Stage 2: train a bank of LayerNorm+Linear heads over STORE; the validation "
        "split picks the best, which is tested and saved.",
        formatter_class=_DEFAULTS,
    )
    p.add_argument("store", metavar="STORE", help="store path or URL (see carrot store ls)")
    add_probe_options(p)
    p.add_argument(
        "--trainable-blocks",
        type=positive_int,
        default=None,
        metavar="N",
        help="over an activation cache (carrot embed --cache-at block:-M): train the "
        "backbone's last N ≤ M blocks, final norm and a LayerNorm+Linear head (one --aug, "
        "default none; the first --lrs, default 1e-3; the first --wds; --batch-size default 64)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="with --trainable-blocks, over a cache embedded from a checkpoint: that file "
        "(checked against the store's sha256)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder, replaced as a whole; not given: $CARROT_HOME/runs/<store>-<augs>",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(run=run_train)


def add_probe_options(p: argparse.ArgumentParser) -> None:
    """Options of ``train``: the head grid, CARROT, the loop (each with a help text, so that
    ``ArgumentDefaultsHelpFormatter`` shows its default)."""
    g = p.add_argument_group("heads")
    g.add_argument(
        "--aug",
        default=",".join(DEFAULT_AUGS),
        metavar="NAMES",
        help="comma list of none|carrot|gaussian|isda|dc|mixup: the validation split picks; "
        "the plain heads guard against harm",
    )
    g.add_argument(
        "--lrs",
        type=positive_floats,
        default=",".join(f"{v:g}" for v in DEFAULT_LRS),
        metavar="LIST",
        help="learning rates of minibatch heads (augmented, or all when streamed; plain heads "
        "are solved by L-BFGS); comma list, each > 0",
    )
    g.add_argument(
        "--wds",
        type=nonneg_floats,
        default=",".join(f"{v:g}" for v in DEFAULT_WEIGHT_DECAYS),
        metavar="LIST",
        help="weight decays λ: the L2 term λ/2·‖W‖² of every head's objective (scikit-learn's "
        "C = 1/(λ·N)); comma list, each ≥ 0",
    )
    g.add_argument(
        "--epochs",
        type=positive_int,
        default=_TRAIN.epochs,
        metavar="E",
        help="most epochs of a minibatch head (it stops once its objective settles)",
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=_TRAIN.batch_size, metavar="B", help="batch size"
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=_TRAIN.optimizer,
        help="optimizer of minibatch heads",
    )
    g.add_argument(
        "--label-smoothing",
        type=fraction,
        default=None,
        metavar="F",
        help="label smoothing in (0, 1); None: no smoothing",
    )
    g.add_argument(
        "--min-steps",
        type=nonneg_int,
        default=_TRAIN.min_steps,
        metavar="N",
        help="small train sets get more epochs: at least N steps",
    )
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of heads and batches")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N",
    )
    add_threads_option(g)
    g.add_argument(
        "--shots",
        type=positive_int,
        metavar="K",
        help="few-shot: K training rows per class; None: all training rows",
    )
    g.add_argument("--seeds", type=positive_int, default=3, metavar="S", help="few-shot seeds")
    g.add_argument("--baseline", action="store_true", help="also fit logistic regression")
    c = p.add_argument_group("CARROT")
    c.add_argument("--mode", choices=("sample", "class"), default="sample", help="CARROT mode")
    c.add_argument(
        "--topk", type=positive_int, default=10, metavar="K", help="nearest directions used"
    )
    c.add_argument("--delta", type=fraction, default=0.05, metavar="D", help="CARROT delta")
    c.add_argument("--gamma", type=nonneg_float, default=0.0, metavar="G", help="CARROT gamma")
    c.add_argument(
        "--noise", choices=("isotropic", "class_cov"), default="isotropic", help="noise shape"
    )
    c.add_argument(
        "--injection",
        choices=("post_ln", "pre_ln"),
        default="post_ln",
        help="where the noise is added",
    )
    c.add_argument(
        "--aug-weight",
        type=nonneg_float,
        default=1.0,
        metavar="W",
        help="weight of the augmented loss",
    )
    c.add_argument(
        "--alpha-max",
        type=nonneg_float,
        default=None,
        metavar="R",
        help="cap the noise norm at R × the feature norm; None: no cap",
    )
    c.add_argument(
        "--aug-warmup-epochs",
        type=nonneg_int,
        default=0,
        metavar="E",
        help="epochs without augmentation first",
    )


def add_threads_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--threads N|auto``: torch CPU threads of the training (auto: `pipeline.threads`)."""
    p.add_argument(
        "--threads",
        type=threads_or_auto,
        default="auto",
        metavar="N",
        help="torch CPU threads for training: auto = 1 for small banks (under 1e9 "
        "multiply-adds per step, where threads slow down 2-10x beside a busy process), all "
        "cores for large; N = exactly N (on a shared machine export OMP_WAIT_POLICY=PASSIVE)",
    )


def resolve_device_option(name: str, *, option: str = "--device") -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; others checked (InputError naming the
    option: unknown, ``cuda`` without CUDA, a GPU index that does not exist)."""
    from pipeline.embed.backbone import resolve_device
    from pipeline.errors import InputError

    try:
        return str(resolve_device(name))
    except InputError as e:
        raise InputError(f"{option} {name}: {e}") from None


def _floats(value: str | tuple[float, ...], *, option: str, positive: bool) -> tuple[float, ...]:
    """Values of ``--lrs`` / ``--wds`` (already parsed by argparse; strings parsed here)."""
    from pipeline.errors import InputError

    if not isinstance(value, str):
        return tuple(value)
    try:
        return positive_floats(value) if positive else nonneg_floats(value)
    except argparse.ArgumentTypeError as e:
        raise InputError(f"{option}: {e}") from None


def probe_settings_from_args(args: argparse.Namespace):
    """Resolve parsed options into :class:`pipeline.heads.probe.ProbeSettings` (validated, the device
    resolved)."""
    from pipeline.augment.carrot import CarrotConfig
    from pipeline.errors import InputError
    from pipeline.heads.probe import ProbeSettings, parse_names
    from pipeline.heads.train import TrainConfig

    device = resolve_device_option(args.device)
    try:
        carrot = CarrotConfig(
            topk=args.topk,
            delta=args.delta,
            gamma=args.gamma,
            mode=args.mode,
            noise=args.noise,
            injection=args.injection,
            aug_weight=args.aug_weight,
            alpha_max=args.alpha_max,
        )
    except ValueError as e:
        raise InputError(f"CARROT options: {e}") from None
    train = TrainConfig(
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        label_smoothing=args.label_smoothing or 0.0,
        seed=args.seed,
        device=device,
        aug_warmup_epochs=args.aug_warmup_epochs,
        min_steps=args.min_steps,
    )
    return ProbeSettings(
        augs=parse_names(args.aug),
        carrot=carrot,
        lrs=_floats(args.lrs, option="--lrs", positive=True),
        weight_decays=_floats(args.wds, option="--wds", positive=False),
        train=train,
        shots=args.shots,
        seeds=tuple(range(args.seeds)),
        baseline=args.baseline,
        threads=getattr(args, "threads", None),
    )


def check_shots(store, shots: int | None) -> None:
    """``--shots K`` needs K training rows of every class in the store's train split."""
    import numpy as np

    from pipeline.errors import InputError

    if shots is None:
        return
    if "train" not in store.splits():
        raise InputError(f"--shots {shots}: {store.url} has no train split; embed it with one")
    labels = store.labels("train")
    counts = np.bincount(labels, minlength=len(store.class_names))
    present = np.flatnonzero(counts)
    smallest = present[np.argmin(counts[present])]
    if counts[smallest] < shots:
        raise InputError(
            f"--shots {shots}: the smallest class in the train split of {store.url}, "
            f"{store.class_names[smallest]!r}, has {counts[smallest]} rows; use --shots "
            f"{counts[smallest]} or fewer"
        )


def default_out(store_url: str, tag: str) -> str:
    """``$CARROT_HOME/runs/<store name>-<tag>``."""
    from pipeline.home import carrot_home

    name = Path(store_url.rstrip("/")).name.removesuffix(".zarr")
    return str(carrot_home() / "runs" / f"{name}-{tag}")


def run_train(args: argparse.Namespace) -> int:
    """Check every input (options, device, store, ``--shots``, ``--out``), then run the flow."""
    from flows.runtime import flow_settings
    from flows.train import train_head_flow
    from pipeline.errors import InputError
    from pipeline.heads.io import check_out_dir
    from stores import open_store

    settings = probe_settings_from_args(args)
    store = open_store(args.store)  # fail fast (exit 2) on a missing or incomplete store
    store.labels()  # labels outside the class names (an edited store): refused before a flow
    if args.trainable_blocks is not None:
        return run_train_top(args, store)
    if args.checkpoint is not None:
        raise InputError(
            f"--checkpoint {args.checkpoint}: only a --trainable-blocks run rebuilds the "
            "backbone; a head trains on the stored features alone (drop --checkpoint)"
        )
    check_shots(store, settings.shots)
    out = args.out or default_out(store.url, "-".join(settings.augs))
    check_out_dir(out)
    with flow_settings():
        summary = train_head_flow(store.url, settings, out)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print_train_summary(summary)
    return 0


def run_train_top(args: argparse.Namespace, store) -> int:
    """``carrot train STORE --trainable-blocks N``: the partially frozen run (flow train-top)."""
    from flows.runtime import flow_settings
    from flows.train import train_top_flow
    from pipeline.embed.backbone import resolve_device
    from pipeline.errors import InputError
    from pipeline.heads.probe import parse_names
    from pipeline.heads.top import TopSettings, backbone_config_of, check_blocks

    defaults = {  # the bank's defaults, left as they are: this mode's own (TopSettings) apply
        "aug": ",".join(DEFAULT_AUGS),
        "lrs": ",".join(f"{v:g}" for v in DEFAULT_LRS),
        "batch_size": _TRAIN.batch_size,
    }
    own = {k for k, v in defaults.items() if getattr(args, k) == v}
    augs = ("none",) if "aug" in own else parse_names(args.aug)
    if len(augs) != 1:
        raise InputError(
            f"--trainable-blocks trains one model: give one --aug (got {','.join(augs)}), "
            "e.g. --aug none or --aug carrot"
        )
    check_blocks(store, args.trainable_blocks)  # before a Prefect server starts
    backbone_config_of(store, checkpoint=args.checkpoint)  # a checkpoint-written cache's file
    settings = TopSettings(
        blocks=args.trainable_blocks,
        aug=augs[0],
        epochs=args.epochs,
        lr=TopSettings.lr if "lrs" in own else _floats(args.lrs, option="--lrs", positive=True)[0],
        weight_decay=_floats(args.wds, option="--wds", positive=False)[0],
        batch_size=TopSettings.batch_size if "batch_size" in own else args.batch_size,
        seed=args.seed,
        device=str(resolve_device(args.device)),
        checkpoint=args.checkpoint,
    )
    from pipeline.heads.io import check_out_dir

    out = args.out or default_out(store.url, f"top{settings.blocks}-{settings.aug}")
    check_out_dir(out)
    with flow_settings():
        summary = train_top_flow(store.url, settings, out)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        losses = ", ".join(f"{v:.3f}" for v in summary["train_loss"])
        print(
            f"trained  {len(summary['trainable'])} tensors of the last {settings.blocks} "
            f"block(s), norms and head; aug={settings.aug}"
        )
        print(f"loss     {losses}  (per epoch)")
        print(
            f"top-1    val {percent(summary['val_top1'])}  test {percent(summary['test_top1'])}  "
            f"({summary['seconds']:.1f} s)"
        )
        print(f"wrote    {summary['files']['weights']}, {summary['files']['config']}")
    return 0


def percent(v) -> str:
    """A fraction as a 5-wide percentage, or n/a."""
    return "  n/a" if v is None else f"{100 * v:5.1f}"


def print_train_summary(s: dict) -> None:
    spec = s.get("best_head", {})
    print(f"best head  lr={spec.get('lr')} wd={spec.get('weight_decay')} aug={spec.get('aug')}")
    print(
        f"test       top1 {percent(s.get('top1'))} %   top5 {percent(s.get('top5'))} %   "
        f"mean/class {percent(s.get('mean_per_class'))} %"
    )
    if "baseline" in s:
        print(
            f"baseline   top1 {percent(s['baseline'].get('top1'))} %  (logistic regression, "
            f"C={s['baseline'].get('C'):.3g})"
        )
    if s.get("carrot_diagnostics"):
        d = s["carrot_diagnostics"]
        print("carrot     " + "  ".join(f"{k}={v:.3g}" for k, v in d.items()))
    print(f"outputs    {s.get('out')}")


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict a store's rows with a saved head",
        description="Predict a store's rows with a head saved by carrot train; accuracy when "
        "the store has the head's classes.",
        formatter_class=_DEFAULTS,
    )
    p.add_argument("store", metavar="STORE", help="store path or URL")
    p.add_argument(
        "--head",
        required=True,
        metavar="DIR",
        help="folder written by carrot train (a head, or a --trainable-blocks run)",
    )
    p.add_argument("--split", help="only this split; None: all rows")
    p.add_argument(
        "--out", metavar="CSV", help="predictions file; None: DIR/predictions-<store>.csv"
    )
    p.add_argument(
        "--allow-other-classes",
        action="store_true",
        help="predict a store whose classes are not the head's (no labels, no accuracy)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Check the store, the head (files, width, classes), the split and ``--out`` first."""
    from flows.runtime import flow_settings
    from flows.train import predict_flow
    from pipeline.errors import InputError
    from pipeline.heads.io import check_out_file
    from pipeline.heads.predict import open_predictor
    from stores import open_store

    store = open_store(args.store)
    # fail fast on a bad --head
    labelled = open_predictor(
        args.head, store, allow_other_classes=args.allow_other_classes
    ).labelled
    if args.split is not None and args.split not in store.splits():
        raise InputError(f"--split {args.split}: the store has splits {store.splits()}")
    name = Path(store.url.rstrip("/")).name.removesuffix(".zarr")
    out = args.out or str(Path(args.head) / f"predictions-{name}.csv")
    check_out_file(out)
    with flow_settings():
        summary = predict_flow(store.url, args.head, out, args.split, args.allow_other_classes)
    if args.json:
        print(json.dumps(summary))
    elif labelled:
        print(f"wrote {summary['n']} predictions to {out} (top1 {percent(summary['top1'])} %)")
    else:
        print(
            f"wrote {summary['n']} predictions to {out} (no accuracy: the store's classes are "
            "not the head's)"
        )
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="digits → embed → head banks with and without CARROT",
        description="Embed scikit-learn's digits with a random-init timm backbone, then train "
        "head banks with and without CARROT (all data and 5 shots) and compare them.",
        formatter_class=_DEFAULTS,
    )
    p.add_argument("--backbone", default="resnet18", metavar="NAME", help="timm model, random init")
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=64,
        metavar="N",
        help="input size for the backbone (small: fast on a CPU)",
    )
    p.add_argument("--root", metavar="DIR|URL", help="store root; None: $CARROT_HOME/stores")
    p.add_argument("--out", metavar="DIR", help="output folder; None: $CARROT_HOME/runs/demo")
    p.add_argument("--epochs", type=positive_int, default=30, metavar="E", help="epochs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_threads_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo_flow, markdown_table
    from flows.runtime import flow_settings
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, check_settings, default_root
    from pipeline.heads.io import check_out_dir
    from pipeline.heads.probe import ProbeSettings
    from pipeline.heads.train import TrainConfig
    from pipeline.home import carrot_home

    device = resolve_device_option(args.device)
    embed = EmbedSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name=args.backbone, image_size=args.image_size, device=device),
        extract=ExtractConfig(batch_size=128),
        root=args.root or default_root(),
    )
    check_settings(embed)
    probe = ProbeSettings(
        train=TrainConfig(epochs=args.epochs, device=device), baseline=True, threads=args.threads
    )
    out = args.out or str(carrot_home() / "runs" / "demo")
    check_out_dir(out)
    with flow_settings():
        table = demo_flow(embed, probe, out)
    if args.json:
        print(json.dumps(table, default=str))
        return 0
    print(f"store  {table['store']}  ({table['embed']['n']} images, D={table['embed']['dim']})")
    print(markdown_table(table["rows"]))
    print(f"plots and heads in {out} (comparison.png, */learning_curves.png, */confusion.png)")
    return 0
