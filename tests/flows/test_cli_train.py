"""``carrot train``, ``predict``, ``demo`` and ``bench quality`` as a user runs them."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flows.cli import main
from pipeline.embed.backbone import BackboneConfig
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> str:
    """sklearn digits embedded by the tiny test_vit (real stage 1, ~2 s)."""
    root = tmp_path_factory.mktemp("stores")
    s = run_embedding(
        EmbedSettings(
            data="sklearn:digits",
            backbone=BackboneConfig(name="test_vit"),
            extract=ExtractConfig(batch_size=256, num_workers=0),
            root=str(root),
        )
    )
    return s.store


def _run(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_json_outputs_and_predict(prefect_harness, digits_store, tmp_path, capsys):
    out = tmp_path / "run"
    s = _run(
        capsys,
        "train",
        digits_store,
        "--aug",
        "none,carrot",
        "--epochs",
        "5",
        "--lrs",
        "1e-2,3e-2",
        "--wds",
        "0",
        "--out",
        str(out),
        "--json",
    )
    for key in ("top1", "top5", "mean_per_class"):
        assert 0.0 <= s[key] <= 1.0
    assert s["top1"] > 0.3  # digits are learnable even from a random tiny ViT
    assert s["out"] == str(out) and s["best_head"]["aug"] in ("none", "carrot")
    for name in (
        "head.safetensors",
        "config.json",
        "metrics.json",
        "predictions.csv",
        "learning_curves.png",
        "confusion.png",
        "summary.json",
    ):
        assert (out / name).is_file(), name

    p = _run(
        capsys,
        "predict",
        digits_store,
        "--head",
        str(out),
        "--split",
        "test",
        "--out",
        str(tmp_path / "pred.csv"),
        "--json",
    )
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == p["n"] > 0
    assert p["top1"] == pytest.approx(s["top1"], abs=1e-6)  # same head, same test rows


def test_train_few_shot_reports_mean_and_std(prefect_harness, digits_store, tmp_path, capsys):
    s = _run(
        capsys,
        "train",
        digits_store,
        "--aug",
        "none",
        "--shots",
        "2",
        "--seeds",
        "2",
        "--epochs",
        "5",
        "--lrs",
        "1e-2",
        "--wds",
        "0",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert s["shots"] == 2 and s["seeds"] == [0, 1] and "top1" in s["std"]
    assert len(s["runs"]) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--aug", "sparkles"], "sparkles"),
        (["--delta", "2"], "--delta"),
        (["--lrs", "fast"], "--lrs"),
        (["--epochs", "0"], "--epochs"),
    ],
)
def test_train_bad_options_exit_2_in_one_line(digits_store, args, needle, capsys, no_server):
    assert main(["train", digits_store, *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0]


def test_train_on_a_missing_store_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.zarr")]) == 2
    assert "nope.zarr" in capsys.readouterr().err


def test_bench_quality_on_a_user_store(digits_store, tmp_path, capsys):
    out = tmp_path / "quality"
    rows = _run(
        capsys,
        "bench",
        "quality",
        "--no-builtin",
        "--store",
        digits_store,
        "--shots",
        "2,all",
        "--seeds",
        "2",
        "--methods",
        "plain,carrot-sample,logreg",
        "--out",
        str(out),
        "--json",
    )
    methods = {(r["shots"], r["method"]) for r in rows}
    assert methods == {(k, m) for k in (2, "all") for m in ("plain", "carrot-sample", "logreg")}
    for r in rows:
        assert r["seeds"] == 2 and r["top1_lo"] <= r["top1"] <= r["top1_hi"]
        if r["method"] == "plain":
            assert r["diff_vs_plain"] == 0.0
    data = json.loads((out / "quality.json").read_text())
    assert len(data["records"]) == 2 * 2 * 3
    assert (out / "quality.md").read_text().count("| 2 |") == 3
    assert list(out.glob("quality_*.png"))


def test_demo_runs_end_to_end(prefect_harness, tmp_path, capsys):
    table = _run(
        capsys,
        "demo",
        "--backbone",
        "test_vit",
        "--image-size",
        "32",
        "--epochs",
        "3",
        "--root",
        str(tmp_path / "stores"),
        "--out",
        str(tmp_path / "demo"),
        "--json",
    )
    methods = [(r["regime"], r["method"]) for r in table["rows"]]
    assert ("all data", "plain head") in methods and ("all data", "CARROT") in methods
    assert ("5 shots/class", "CARROT") in methods
    assert Path(tmp_path / "demo" / "comparison.png").is_file()


# --------------------------------------------------------------------------- bad input, no server


def _exit_2_one_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _synthetic_store(root: Path, name: str, *, n_classes: int, dim: int = 8) -> str:
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    data = synthetic_data(150, dim=dim, n_classes=n_classes, seed=n_classes)
    return write_synthetic_store(str(root / name), data, synthetic_identity(data), chunk_rows=64)


@pytest.fixture(scope="module")
def class_stores(tmp_path_factory) -> dict[int, str]:
    """Real stores of the same width D=8 with 3 and 4 classes (class0..classC-1)."""
    root = tmp_path_factory.mktemp("class-stores")
    return {c: _synthetic_store(root, f"c{c}.zarr", n_classes=c) for c in (3, 4)}


def _head(path: Path, *, dim: int, classes: int) -> str:
    import torch

    from pipeline.heads.bank import Head
    from pipeline.heads.io import save_head

    torch.manual_seed(classes)
    save_head(Head(dim, classes), path, class_names=[f"class{c}" for c in range(classes)])
    return str(path)


@pytest.mark.parametrize(("head_classes", "store_classes"), [(4, 3), (3, 4)])
def test_predict_refuses_a_store_of_other_classes(
    no_server, class_stores, tmp_path, capsys, head_classes, store_classes
):
    head = _head(tmp_path / "head", dim=8, classes=head_classes)
    csv_path = tmp_path / "pred.csv"
    line = _exit_2_one_line(
        capsys, ["predict", class_stores[store_classes], "--head", head, "--out", str(csv_path)]
    )
    assert f"{head_classes} classes" in line and "--allow-other-classes" in line
    assert not csv_path.exists()


def test_predict_refuses_the_same_classes_in_another_order(no_server, tmp_path, capsys):
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    data = synthetic_data(60, dim=8, n_classes=3)
    data = dataclasses.replace(data, class_names=["class2", "class1", "class0"])
    store = write_synthetic_store(str(tmp_path / "s.zarr"), data, synthetic_identity(data))
    head = _head(tmp_path / "head", dim=8, classes=3)
    line = _exit_2_one_line(capsys, ["predict", store, "--head", head])
    assert "another order" in line


def test_predict_other_classes_allowed_gives_no_accuracy(
    prefect_harness, class_stores, tmp_path, capsys
):
    head = _head(tmp_path / "head", dim=8, classes=4)
    csv_path = tmp_path / "pred.csv"
    p = _run(
        capsys,
        "predict",
        class_stores[3],
        "--head",
        head,
        "--out",
        str(csv_path),
        "--allow-other-classes",
        "--json",
    )
    assert p["top1"] is None and p["top5"] is None and p["labelled"] is False
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == p["n"] == 150
    assert all(r["label"] == "" for r in rows)
    assert {r["pred"] for r in rows} <= {f"class{c}" for c in range(4)}


def test_predict_refuses_a_head_of_another_width(no_server, class_stores, tmp_path, capsys):
    head = _head(tmp_path / "head", dim=6, classes=3)
    line = _exit_2_one_line(capsys, ["predict", class_stores[3], "--head", head])
    assert "D=6" in line and "D=8" in line


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda d: (d / "config.json").write_text('{"format_version": 1, "di'), "config.json"),
        (lambda d: (d / "config.json").write_text('{"format_version": 1}'), "config.json"),
        (lambda d: (d / "head.safetensors").write_bytes(b"\x00garbage" * 9), "head.safetensors"),
    ],
)
def test_predict_with_a_corrupt_head_exits_2(
    no_server, class_stores, tmp_path, capsys, corrupt, needle
):
    head = _head(tmp_path / "head", dim=8, classes=3)
    corrupt(Path(head))
    line = _exit_2_one_line(capsys, ["predict", class_stores[3], "--head", head])
    assert needle in line and "carrot train" in line


def _train_argv(store: str, *extra: str) -> list[str]:
    return ["train", store, "--epochs", "1", "--lrs", "1e-2", "--wds", "0", *extra]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--wds", "-1"], "--wds"),
        (["--wds", "1e-2,inf"], "--wds"),
        (["--lrs", "nan"], "--lrs"),
        (["--lrs", "inf"], "--lrs"),
        (["--lrs", "0"], "--lrs"),
        (["--lrs", "1e-2,-1e-3"], "--lrs"),
        (["--lrs", ","], "--lrs"),
        (["--gamma", "inf"], "--gamma"),
        (["--device", "tpu"], "--device"),
        (["--shots", "500"], "--shots"),
    ],
)
def test_train_bad_input_exits_2_before_any_server(
    no_server, class_stores, tmp_path, capsys, args, needle
):
    out = tmp_path / "run"
    line = _exit_2_one_line(capsys, [*_train_argv(class_stores[3], "--out", str(out)), *args])
    assert needle in line
    assert not out.exists()


def test_train_shots_error_names_the_smallest_class(no_server, class_stores, capsys):
    from stores import open_store

    labels = open_store(class_stores[3]).labels("train")
    smallest = int(np.bincount(labels).min())
    line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--shots", str(smallest + 1)))
    assert "--shots" in line and f"{smallest} " in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_train_cuda_without_cuda_exits_2(no_server, class_stores, capsys, device):
    line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--device", device))
    assert "--device" in line


def test_train_device_beyond_the_gpus_exits_2(no_server, class_stores, capsys):
    n = torch.cuda.device_count()
    line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--device", f"cuda:{n + 7}"))
    assert "--device" in line


def test_train_out_that_is_a_file_exits_2(no_server, class_stores, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    for out in (f, f / "sub"):
        line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--out", str(out)))
        assert "--out" in line
    assert f.read_text() == "keep me"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys")
def test_train_out_in_a_read_only_place_exits_2(no_server, class_stores, capsys):
    line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--out", "/sys/carrot-run"))
    assert "--out" in line and "writ" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_out_read_only_folder_exits_2(no_server, class_stores, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        line = _exit_2_one_line(capsys, _train_argv(class_stores[3], "--out", str(ro / "run")))
    finally:
        ro.chmod(0o700)
    assert "--out" in line


def test_train_help_shows_every_default(capsys):
    from flows.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    options = [a for a in train._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default:") == len(options)
    packed = "".join(text.split())  # argparse may break a long default across lines
    for a in options:
        assert "(default:" + "".join(str(a.default).split()) + ")" in packed, a.option_strings
    assert train.parse_args(["s"]).device == "auto"


_any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(st.lists(_any_float, min_size=1, max_size=5))
def test_float_list_options_accept_exactly_the_finite_values_in_range(values):
    """``--lrs`` takes finite values > 0, ``--wds`` finite values ≥ 0; nothing else passes."""
    import argparse

    from flows.cli_args import nonneg_floats, positive_floats

    text = ",".join(repr(v) for v in values)
    for parse, ok in (
        (positive_floats, all(math.isfinite(v) and v > 0 for v in values)),
        (nonneg_floats, all(math.isfinite(v) and v >= 0 for v in values)),
    ):
        if ok:
            assert parse(text) == tuple(values)
        else:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)


@given(
    st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True),
    st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True),
)
def test_a_head_scores_a_store_only_with_the_same_classes_in_the_same_order(head, store):
    from types import SimpleNamespace

    from pipeline.errors import InputError
    from pipeline.heads.predict import check_head_fits

    config = {"dim": 8, "class_names": head, "store": {"url": "train.zarr"}}
    s = SimpleNamespace(dim=8, class_names=store, url="other.zarr")
    assert check_head_fits(config, s, head_dir="h", allow_other_classes=True) == (head == store)
    if head != store:
        with pytest.raises(InputError, match="--allow-other-classes"):
            check_head_fits(config, s, head_dir="h")


# --------------------------------------------------------------------------- --threads


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "", "٣"])
@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_bad_thread_count_exits_2_naming_the_option(
    no_server, class_stores, capsys, command, value
):
    argv = _train_argv(class_stores[3]) if command == "train" else ["demo"]
    line = _exit_2_one_line(capsys, [*argv, "--threads", value])
    assert "--threads" in line and "positive integer, or auto" in line


def test_threads_default_to_the_policy_and_take_a_count():
    from flows.cli import build_parser
    from flows.cli_train import probe_settings_from_args

    parser = build_parser()
    for argv, expected in (
        (["s"], None),
        (["s", "--threads", "auto"], None),
        (["s", "--threads", "3"], 3),
    ):
        args = parser.parse_args(["train", *argv, "--device", "cpu"])
        assert args.threads == expected
        assert probe_settings_from_args(args).threads == expected
    assert parser.parse_args(["demo"]).threads is None
    assert parser.parse_args(["demo", "--threads", "2"]).threads == 2


def test_threads_help_shows_auto_and_the_policy_threshold(capsys):
    from pipeline.threads import THREADS_FROM_WORK

    for command in ("train", "demo"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--threads N" in text and "(default: auto)" in text
        assert f"under {THREADS_FROM_WORK:.0e}".replace("e+0", "e") in text  # "under 1e9"
