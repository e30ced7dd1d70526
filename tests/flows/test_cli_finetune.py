"""``carrot finetune``: the flow run end to end (export, re-embed, predict with the exported
head), and options that cannot work as one-line errors (exit 2) before any server starts."""

from __future__ import annotations

import json

import pytest

from flows.cli import main

_BASE = ["finetune", "sklearn:digits", "--backbone", "test_vit", "--image-size", "32"]


def test_finetune_exports_reembeds_and_predicts(prefect_harness, tmp_path, capsys):
    out, root = tmp_path / "ft", tmp_path / "stores"
    argv = [*_BASE, "--epochs", "1", "--batch-size", "64", "--workers", "0", "--out", str(out)]
    assert main([*argv, "--reembed", "--root", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["epochs"] == 1 and summary["steps"] == 20
    assert summary["files"]["backbone"] == str(out / "best" / "model.safetensors")
    store = summary["store"]["store"]
    assert store.startswith(str(root)) and summary["store"]["n"] == 1797
    from stores import open_store

    weights = open_store(store).identity.weights
    assert weights["kind"] == "checkpoint" and weights["file"] == "model.safetensors"
    csv = tmp_path / "pred.csv"
    head = summary["files"]["head"]
    assert main(["predict", store, "--head", head, "--split", "test", "--out", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed or "top1" in printed
    lines = csv.read_text().splitlines()
    assert len(lines) == 1 + 360
    # the same command again refuses to overwrite; --resume of the finished run only reports
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["steps"] == 20 and again["test_top1"] == summary["test_top1"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "0"], "expected a finite number > 0"),
        (["--layer-decay", "2"], "--layer-decay 2.0"),
        (["--aug", "dc"], "--aug dc"),
        (["--checkpoint", "/no/such.safetensors"], "no such file"),
        (["--device", "cuda:7"], "cuda"),
        (["--resume", "--out", "{tmp}/never"], "no checkpoint.pt"),
        (["--init-head", "{tmp}/nohead"], "not a saved head"),
    ],
)
def test_bad_options_exit_2_in_one_line(no_server, tmp_path, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main([*_BASE, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_unknown_backbone_names_close_matches(no_server, capsys):
    assert main(["finetune", "sklearn:digits", "--backbone", "test_vitt"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "test_vit" in err
