"""``carrot sweep``: two tiny timm backbones and an unknown one through the real flow (one
Prefect server for the session) — two result rows and one error row, the files and artifacts;
a rerun reuses every finished row; the spec file's checks; the CLI's usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.evaluation.sweep import SweepSpec


@pytest.mark.slow
def test_sweep_rows_errors_files_artifacts_and_reuse(tmp_path, prefect_harness, monkeypatch):
    from prefect.artifacts import Artifact

    from flows.runtime import flow_settings
    from flows.sweep import sweep_flow

    monkeypatch.setenv("CARROT_HOME", str(tmp_path))
    spec = SweepSpec(
        data="sklearn:digits",
        backbones=("test_vit", "test_resnet", "no_such_backbone"),
        root=str(tmp_path / "stores"),
    )
    out = tmp_path / "sweep"
    with flow_settings():
        first = sweep_flow(spec, str(out))
    rows = {r["backbone"]: r for r in first["rows"]}
    assert [r["backbone"] for r in first["rows"]] == list(spec.backbones)
    assert "no_such_backbone" in rows["no_such_backbone"]["error"]
    for name in ("test_vit", "test_resnet"):
        r = rows[name]
        assert r["error"] is None and r["dim"] > 0 and 0 < r["params_m"] < 5
        assert 0.5 < r["probe_top1"] <= 1 and 0.2 < r["knn20_top1"] <= 1
        lo, mid, hi = (
            r["carrot_minus_plain_lo"],
            r["carrot_minus_plain"],
            r["carrot_minus_plain_hi"],
        )
        assert lo <= mid <= hi and hi - lo < 0.2
        assert r["images_per_s"] > 0 and not r["reused"]
    saved = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(saved) == 3 and (out / "sweep.png").stat().st_size > 1000
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("backbone,params_m,dim")
    for key in ("sweep-table", "sweep-summary", "sweep-chart"):
        assert Artifact.get(key) is not None, key

    with flow_settings():
        again = sweep_flow(spec, str(out))
    reused = {r["backbone"]: r for r in again["rows"]}
    assert reused["test_vit"]["reused"] and reused["test_resnet"]["reused"]
    assert reused["test_vit"]["probe_top1"] == rows["test_vit"]["probe_top1"]
    assert reused["no_such_backbone"]["error"]  # failures are retried, and fail again


def test_spec_file_is_checked(tmp_path):
    good = tmp_path / "sweep.toml"
    good.write_text(
        'version = 1\ndata = "sklearn:digits"\nbackbones = ["test_vit", "test_resnet"]\n'
    )
    spec = SweepSpec.from_toml(good, augs=None, root=str(tmp_path))
    assert spec.backbones == ("test_vit", "test_resnet") and spec.root == str(tmp_path)
    cases = {
        'data = "x"\nbackbones = ["a"]\n': "version = 1",
        'version = 2\ndata = "x"\nbackbones = ["a"]\n': "version 2 is not supported",
        'version = 1\ndata = "x"\nbackbones = ["a"]\ncolour = 3\n': "unknown keys ['colour']",
        'version = 1\ndata = "x"\nbackbones = ["a"]\nshots = 3\n': "'shots' must be a list",
        'version = 1\ndata = "x"\nbackbones = ["a"]\nshots = [0]\n': "give positive integers",
        'version = 1\ndata = "x"\nbackbones = ["a"]\nshots = [5, 5]\n': "listed twice",
        'version = 1\nbackbones = ["a"]\n': "needs 'data'",
        'version = 1\ndata = "x"\nbackbones = ["a", "a"]\n': "listed twice",
        "version = \n": "not valid TOML",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            SweepSpec.from_toml(good)
    with pytest.raises(InputError, match="'none'"):
        SweepSpec(data="x", backbones=("a",), augs=("carrot",))


def test_cli_usage_errors_are_one_line_exit_2(tmp_path):
    carrot = str(Path(sys.executable).with_name("carrot"))
    # through the installed console script (the catalogue of flows.faults has the others)
    for args in (["sweep", "sklearn:digits"],):
        r = subprocess.run(
            [carrot, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
