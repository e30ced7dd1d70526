"""A catalogue of bad inputs: wrong command lines, files and stores, each run through
``carrot``'s own entry point (`flows.cli.main`, in process) and judged by what a user sees.

A case passes when the command exits with code 2, prints exactly one non-empty line on stderr
that holds the case's ``needle`` (the input it names, or the fix), prints no traceback, and
starts no Prefect flow or server (`no_flows`: reaching one is a failure — the input was
checked too late) and writes no store, except for damage only the data's bytes show (``in_flow``: NaN written into a
store), which the flow's first read refuses. `prepare` writes every file and store the cases need under one folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.faults.console import carrot


@dataclass(frozen=True)
class BadInput:
    """One bad input: ``argv(root)`` is the command line (``root``: `prepare`'s folder)."""

    name: str
    argv: Callable[[Path], list[str]]
    needle: str  # text the one stderr line must hold
    in_flow: bool = False  # found only by reading the data, inside the flow run (not before)


@dataclass(frozen=True)
class Outcome:
    """What the user saw."""

    name: str
    code: int
    lines: list[str]  # non-empty stderr lines
    traceback: bool
    needle_found: bool
    wrote_store: bool = False  # a store appeared under the case's --root

    @property
    def ok(self) -> bool:
        return (
            self.code == 2
            and len(self.lines) == 1
            and not self.traceback
            and self.needle_found
            and not self.wrote_store
        )


class ReachedFlow(RuntimeError):
    """A bad input got as far as a Prefect flow or server."""


@contextlib.contextmanager
def no_flows() -> Iterator[None]:
    """While active, starting carrot's Prefect settings (every flow run goes through
    `flows.runtime.flow_settings`) raises `ReachedFlow`."""
    import flows.runtime

    def refuse(*_a, **_k):
        raise ReachedFlow("a Prefect flow was started for bad input")

    saved = flows.runtime.flow_settings
    flows.runtime.flow_settings = refuse
    try:
        yield
    finally:
        flows.runtime.flow_settings = saved


def run_case(case: BadInput, root: Path) -> Outcome:
    """Run one case in process (``CARROT_HOME`` under ``root``) and judge it."""
    guard = contextlib.nullcontext() if case.in_flow else no_flows()
    with guard:
        code, _, text = carrot(case.argv(root), CARROT_HOME=str(root / "home"))
    lines = [ln for ln in text.splitlines() if ln.strip()]
    written = root / "out"
    wrote_store = written.exists() and any(written.rglob("*.zarr"))
    shutil.rmtree(written, ignore_errors=True)
    return Outcome(
        name=case.name,
        code=code,
        lines=lines,
        traceback="Traceback (most recent call last)" in text,
        needle_found=bool(lines) and case.needle in lines[0],
        wrote_store=wrote_store,
    )


# ------------------------------------------------------------------------------ the inputs
def _image(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _image(root / name / f"{i}.png", seed=100 * c + i)
    return root


def _csv(root: Path, name: str, text: str | bytes) -> Path:
    path = root / "csv" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def prepare(root: Path) -> Path:
    """Write the files and stores the cases read, under ``root``; returns ``root``."""
    import timm
    import torch
    from safetensors.torch import save_file

    from pipeline.heads.bank import Head
    from pipeline.heads.io import save_head
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    root.mkdir(parents=True, exist_ok=True)
    _folder(root / "good", {"a": 3, "b": 3})
    _folder(root / "one-class", {"only": 4})
    (root / "empty").mkdir(exist_ok=True)
    _folder(root / "hollow", {"a": 3, "b": 0})  # a class folder with no images
    for i in range(3):
        _image(root / "csv" / "img" / f"{i}.png", seed=i)
    _image(root / "far" / "x.png", seed=9)
    _csv(root, "missing-columns.csv", "file,class\nimg/0.png,a\n")
    _csv(root, "bad-split.csv", "path,label,split\nimg/0.png,a,train\nimg/1.png,b,holdout\n")
    _csv(root, "duplicate.csv", "path,label\nimg/0.png,a\nimg/0.png,a\nimg/1.png,b\n")
    _csv(root, "escape.csv", "path,label\nimg/0.png,a\n../far/x.png,b\n")
    _csv(root, "latin1.csv", b"path,label\nimg/0.png,caf\xe9\nimg/1.png,b\n")
    _csv(root, "no-rows.csv", "path,label\n")
    _csv(root, "missing-file.csv", "path,label\nimg/0.png,a\nimg/nope.png,b\n")

    torch.manual_seed(0)
    resnet = timm.create_model("test_resnet", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in resnet.items()}, root / "resnet.safetensors")
    vit = timm.create_model("test_vit", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in vit.items()}, root / "vit.safetensors")
    nan = {k: v.clone().contiguous() for k, v in resnet.items()}
    nan["conv1.0.weight"][0] = float("nan")
    save_file(nan, root / "nan.safetensors")
    (root / "notes.pth").write_text("a text file, not weights\n")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pickled code ran > " + str(root / "PWNED"),))

    torch.save({"state_dict": resnet, "x": Evil()}, root / "evil.pth")

    stores = root / "stores"
    data = synthetic_data(300, dim=8, n_classes=3, seed=0)
    good = write_synthetic_store(str(stores / "good.zarr"), data, synthetic_identity(data))
    for name in DAMAGED:
        write_synthetic_store(
            str(stores / f"{name}.zarr"), data, synthetic_identity(data), chunk_rows=100
        )
    _damage(stores)
    wide = synthetic_data(300, dim=16, n_classes=3, seed=1)
    write_synthetic_store(str(stores / "wide.zarr"), wide, synthetic_identity(wide))
    other = synthetic_data(300, dim=8, n_classes=4, seed=2)
    write_synthetic_store(str(stores / "other.zarr"), other, synthetic_identity(other))
    few = synthetic_data(30, dim=8, n_classes=3, seed=3)
    write_synthetic_store(str(stores / "few.zarr"), few, synthetic_identity(few))
    tokens = synthetic_identity(data, extra={"cache_at": "block:-1", "tokens": [2, 4]})
    write_synthetic_store(str(stores / "tokens.zarr"), data, tokens)

    save_head(Head(8, 3), root / "head", class_names=data.class_names, store_url=good)
    (root / "not-a-head").mkdir(exist_ok=True)
    (root / "a-file").write_text("x")
    return root


DAMAGED = ("schema", "no-array", "bad-json", "no-chunk", "nan", "labels")
"""The damaged stores `prepare` writes (``stores/<name>.zarr``); `carrot store verify` must
fail on each."""


def _damage(stores: Path) -> None:
    """Break the stores named for their damage, as a crash, a tool or a user would."""
    import zarr

    meta = stores / "schema.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 999
    meta.write_text(json.dumps(doc))
    shutil.rmtree(stores / "no-array.zarr" / "labels")
    (stores / "bad-json.zarr" / "zarr.json").write_text('{"zarr_format": 3, "attrib')
    chunks = sorted(p for p in (stores / "no-chunk.zarr" / "features").rglob("*") if p.is_file())
    next(p for p in chunks if p.name != "zarr.json").unlink()
    feats = zarr.open_array(str(stores / "nan.zarr" / "features"), mode="r+")
    row = np.array(feats[0], dtype=np.float32)
    row[0] = np.nan
    feats[0] = row
    labels = zarr.open_array(str(stores / "labels.zarr" / "labels"), mode="r+")
    labels[:5] = 7  # 3 classes


_EMBED = "embed"
_DIGITS = "sklearn:digits --backbone test_resnet"
_STORE = "{r}/stores/good.zarr"

# name, command line (split on spaces, or a list; "{r}" is prepare's folder), needle[, in_flow]
_CASES: tuple[tuple, ...] = (
    # ---- carrot embed: data
    ("embed: missing path", "embed {r}/nowhere --backbone test_resnet", "nowhere"),
    ("embed: empty folder", "embed {r}/empty --backbone test_resnet", "is empty"),
    ("embed: a class folder without images", "embed {r}/hollow --backbone test_resnet", "['b']"),
    ("embed: one class", "embed {r}/one-class --backbone test_resnet", "one class"),
    (
        "embed: CSV without path/label columns",
        "embed {r}/csv/missing-columns.csv --backbone test_resnet",
        "missing-columns.csv",
    ),
    (
        "embed: CSV with an unknown split",
        "embed {r}/csv/bad-split.csv --backbone test_resnet",
        "holdout",
    ),
    (
        "embed: CSV with a duplicate row",
        "embed {r}/csv/duplicate.csv --backbone test_resnet",
        "img/0.png",
    ),
    (
        "embed: CSV path escaping its folder",
        "embed {r}/csv/escape.csv --backbone test_resnet",
        "../far/x.png",
    ),
    ("embed: CSV not UTF-8", "embed {r}/csv/latin1.csv --backbone test_resnet", "UTF-8"),
    ("embed: CSV with no rows", "embed {r}/csv/no-rows.csv --backbone test_resnet", "no-rows.csv"),
    (
        "embed: CSV naming a missing file",
        "embed {r}/csv/missing-file.csv --backbone test_resnet",
        "nope.png",
    ),
    ("embed: unknown data set", "embed sklearn:nope --backbone test_resnet", "sklearn:nope"),
    # ---- carrot embed: backbone, weights, options
    ("embed: unknown backbone", "embed {r}/good --backbone nope_net", "nope_net"),
    (
        "embed: checkpoint of another model",
        f"embed {_DIGITS} --checkpoint {{r}}/vit.safetensors",
        "does not fit",
    ),
    (
        "embed: pickle checkpoint carrying code",
        f"embed {_DIGITS} --checkpoint {{r}}/evil.pth",
        "pickled code",
    ),
    (
        "embed: checkpoint holding NaN",
        f"embed {_DIGITS} --checkpoint {{r}}/nan.safetensors",
        "conv1.0.weight",
    ),
    (
        "embed: a text file as checkpoint",
        f"embed {_DIGITS} --checkpoint {{r}}/notes.pth",
        "not a PyTorch checkpoint",
    ),
    ("embed: missing checkpoint", f"embed {_DIGITS} --checkpoint {{r}}/gone.pth", "gone.pth"),
    ("embed: --device cuda without CUDA", f"embed {_DIGITS} --device cuda", "cuda"),
    ("embed: --batch-size 0", f"embed {_DIGITS} --batch-size 0", "--batch-size"),
    ("embed: --image-size -5", f"embed {_DIGITS} --image-size -5", "--image-size"),
    ("embed: --views -1", f"embed {_DIGITS} --views -1", "--views"),
    ("embed: --wait 0", f"embed {_DIGITS} --wait 0", "--wait"),
    ("embed: --wait inf", f"embed {_DIGITS} --wait inf", "--wait"),
    ("embed: --dtype int8", f"embed {_DIGITS} --dtype int8", "--dtype"),
    ("embed: --cache-at block:1", f"embed {_DIGITS} --cache-at block:1", "--cache-at"),
    (
        "embed: --cache-at on a family it cannot cut",
        "embed sklearn:digits --backbone test_efficientnet --cache-at block:-1",
        "test_efficientnet",
    ),
    (
        "embed: --features last:0",
        "embed sklearn:digits --backbone test_vit --features last:0",
        "--features",
    ),
    (
        "embed: --features last:2 on a ConvNet",
        f"embed {_DIGITS} --features last:2",
        "no class token",
    ),
    ("embed: --chunk-rows 0", f"embed {_DIGITS} --chunk-rows 0", "--chunk-rows"),
    ("embed: --dask-workers 0", f"embed {_DIGITS} --dask-workers 0", "--dask-workers"),
    ("embed: no --backbone", "embed sklearn:digits", "--backbone"),
    (
        "embed: a --dask-address that is no address",
        f"embed {_DIGITS} --dask-address nonsense",
        "'nonsense'",
    ),
    (
        "embed: --dask-address with --dask-workers",
        f"embed {_DIGITS} --dask-address tcp://a:1 --dask-workers 2",
        "not allowed with argument",
    ),
    # ---- stores
    ("store verify: missing store", "store verify {r}/stores/none.zarr", "none.zarr"),
    ("store info: an edited zarr.json", "store info {r}/stores/bad-json.zarr", "bad-json.zarr"),
    (
        "train: a store of another schema version",
        "train {r}/stores/schema.zarr",
        "schema_version=999",
    ),
    ("train: a store with a missing array", "train {r}/stores/no-array.zarr", "no-array.zarr"),
    ("train: an edited zarr.json", "train {r}/stores/bad-json.zarr", "bad-json.zarr"),
    ("train: a store with a missing chunk", "train {r}/stores/no-chunk.zarr", "no-chunk.zarr"),
    ("train: labels out of range", "train {r}/stores/labels.zarr", "labels.zarr"),
    ("train: NaN written into a store", "train {r}/stores/nan.zarr --epochs 2", "NaN", True),
    ("train: a folder that is not a store", "train {r}/good", "good"),
    # ---- carrot train
    ("train: --shots above the smallest class", "train {r}/stores/few.zarr --shots 50", "--shots"),
    ("train: --epochs 0", f"train {_STORE} --epochs 0", "--epochs"),
    ("train: --lrs -1", f"train {_STORE} --lrs -1", "--lrs"),
    ("train: --lrs not a number", f"train {_STORE} --lrs fast", "--lrs"),
    ("train: --wds nan", f"train {_STORE} --wds nan", "--wds"),
    ("train: --aug unknown", f"train {_STORE} --aug nope", "nope"),
    ("train: --topk 0", f"train {_STORE} --topk 0", "--topk"),
    ("train: --delta 2", f"train {_STORE} --delta 2", "--delta"),
    ("train: --device cuda without CUDA", f"train {_STORE} --device cuda", "cuda"),
    ("train: --threads 0", f"train {_STORE} --threads 0", "--threads"),
    ("train: --out is a file", f"train {_STORE} --out {{r}}/a-file", "a-file"),
    (
        "train: --trainable-blocks on pooled features",
        f"train {_STORE} --trainable-blocks 1",
        "--cache-at",
    ),
    (
        "train: --trainable-blocks above the cache point",
        "train {r}/stores/tokens.zarr --trainable-blocks 2",
        "at most 1",
    ),
    (
        "train: --checkpoint without --trainable-blocks",
        f"train {_STORE} --checkpoint {{r}}/vit.safetensors",
        "--checkpoint",
    ),
    # ---- carrot predict
    ("predict: a head of another width", "predict {r}/stores/wide.zarr --head {r}/head", "D=8"),
    (
        "predict: a head of other classes",
        "predict {r}/stores/other.zarr --head {r}/head",
        "--allow-other-classes",
    ),
    (
        "predict: a folder that is not a head",
        f"predict {_STORE} --head {{r}}/not-a-head",
        "not-a-head",
    ),
    (
        "predict: an unknown split",
        f"predict {_STORE} --head {{r}}/head --split holdout",
        "--split holdout",
    ),
    # ---- carrot finetune, sweep, serve
    ("finetune: --epochs 0", f"finetune {_DIGITS} --epochs 0", "--epochs"),
    (
        "finetune: --init-head that is not a head",
        f"finetune {_DIGITS} --init-head {{r}}/not-a-head",
        "not-a-head",
    ),
    ("finetune: --accum-steps 0", f"finetune {_DIGITS} --accum-steps 0", "--accum-steps"),
    ("sweep: no backbones", "sweep {r}/good", "--backbones"),
    ("sweep: no data", "sweep", "DATA"),
    ("sweep: a missing --config", "sweep --config {r}/nope.toml", "nope.toml"),
    (
        "serve: a bad cron",
        ["serve", "embed", "{r}/good", "--backbone", "test_resnet", "--cron", "61 * * * *"],
        "--cron",
    ),
    ("unknown command", "frobnicate", "frobnicate"),
)


def cases() -> list[BadInput]:
    """Every bad input (≥ 40), by command; ``carrot embed`` gets ``--root`` under the prepared
    folder, so nothing is written elsewhere."""

    def argv(line: str | list[str]) -> Callable[[Path], list[str]]:
        def build(root: Path) -> list[str]:
            words = line.split() if isinstance(line, str) else line
            args = [w.replace("{r}", str(root)) for w in words]
            return [*args, "--root", str(root / "out")] if args[0] == _EMBED else args

        return build

    return [BadInput(name, argv(line), needle, *rest) for name, line, needle, *rest in _CASES]
