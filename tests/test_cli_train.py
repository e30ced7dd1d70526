"""``carrot train``, ``predict``, ``demo`` and ``bench quality`` as a user runs them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from pipeline.backbone import BackboneConfig
from pipeline.embed import EmbedSettings, run_embedding
from pipeline.extract import ExtractConfig


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
def test_train_bad_options_exit_2_in_one_line(digits_store, args, needle):
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", digits_store, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
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
