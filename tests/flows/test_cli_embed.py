"""The ``carrot`` command line and the Prefect ``embed`` flow (real flow runs, test server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from stores import open_store


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit code and streams as a user sees)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_bad_input_from_the_console_is_one_line_and_exit_code_2():
    """As a user's shell sees it, in a new process (the in-process catalogue of
    `flows.faults.bad_inputs`, run by tests/faults, covers the other bad inputs)."""
    r = _cli("embed", "/no/such/folder", "--backbone", "test_resnet")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "/no/such/folder" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["store", "ls", ""], "ROOT ''"),
        (["embed", "x", "--backbone", "test_resnet", "--root", ""], "--root ''"),
    ],
)
def test_an_empty_value_is_named_as_the_user_gave_it(argv, named, capsys):
    """``carrot store ls ''`` names its positional ROOT; ``--root ''`` names the option."""
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and named in lines[0], lines


def test_pretrained_weights_offline_name_the_local_file_option(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["embed", "sklearn:digits", "--backbone", "test_resnet", "--pretrained"]
    assert main(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--checkpoint" in lines[0]


def test_embed_json_then_cache_hit_then_store_commands(
    prefect_harness, shapes_folder, tmp_path, capsys
):
    root = str(tmp_path / "stores")
    args = [
        "embed",
        str(shapes_folder),
        "--backbone",
        "test_resnet",
        "--root",
        root,
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--json",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert {"store", "n", "dim", "skipped", "cache_hit", "seconds"} <= first.keys()
    assert first["cache_hit"] is False and len(first["skipped"]) == 1
    assert open_store(first["store"]).complete

    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cache_hit"] is True and second["store"] == first["store"]

    assert main(["store", "verify", first["store"]]) == 0
    assert main(["store", "info", first["store"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert info["n"] == first["n"] and info["dim"] == first["dim"] and info["complete"]
    assert main(["store", "ls", root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["url"] for r in listed] == [first["store"]]


def test_embed_flow_records_a_completed_run_and_artifact(prefect_harness, shapes_folder, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.cli import build_parser, embed_settings_from_args
    from flows.embed import embed_flow

    args = build_parser().parse_args(
        [
            "embed",
            str(shapes_folder),
            "--backbone",
            "test_vit",
            "--root",
            str(tmp_path),
            "--workers",
            "0",
        ]
    )
    state = embed_flow(embed_settings_from_args(args), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["n"] > 0 and not summary["cache_hit"]

    import asyncio

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["embed-summary"]))
            )

    found = asyncio.run(artifacts())
    assert found and any(summary["store"] in (a.data or "") for a in found)


def test_locked_store_is_refused_with_exit_code_2(prefect_harness, shapes_folder, tmp_path, capsys):
    from flows.cli import build_parser, embed_settings_from_args
    from pipeline.embed.run import open_plan_writer, plan_embedding, resolve_settings_source

    args = [
        "embed",
        str(shapes_folder),
        "--backbone",
        "test_resnet",
        "--root",
        str(tmp_path),
        "--workers",
        "0",
    ]
    settings = embed_settings_from_args(build_parser().parse_args(args))
    plan = plan_embedding(settings, resolve_settings_source(settings))
    with open_plan_writer(plan, settings, dim=64):  # another writer holds the lock
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lock" in err[0].lower()


# --------------------------------------------------------------------------- bad input, in-process


@pytest.fixture
def no_flow(monkeypatch):
    """Bad input must be refused before any Prefect server or the embed flow starts."""
    import flows.embed
    import flows.runtime

    def refuse(*a, **k):
        raise AssertionError("a server or flow started: bad input got past check_settings")

    monkeypatch.setattr(flows.runtime, "flow_settings", refuse)
    monkeypatch.setattr(flows.embed, "embed_flow", refuse)


def _assert_refused(capsys, argv: list[str], needle: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err and "\x1b" not in err and out == ""
    return lines[0]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (extra argv after `embed`, text the one stderr line must hold)."""
    import timm
    import torch
    from image_factory import draw_shape, make_csv_manifest, make_shapes_folder, save_as
    from safetensors.torch import save_file

    folder = make_shapes_folder(tmp / "shapes", per_class=2, odd=False, corrupt=False)
    csv_path = make_csv_manifest(tmp / "csv", per_class=3)
    torch.manual_seed(0)
    sd = timm.create_model("test_resnet", num_classes=0).state_dict()
    sd["conv1.0.weight"][0] = float("nan")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "nan.safetensors")
    vit = timm.create_model("test_vit", num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in vit.items()}, tmp / "vit.safetensors")
    (tmp / "notes.pth").write_text("hello, this is a text file\n")

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": sd, "x": Evil()}, tmp / "evil.pth")
    (tmp / "latin1.csv").write_bytes(b"path,label\nimg/circle-0.png,caf\xe9\n")
    one = tmp / "one"
    save_as(draw_shape("circle"), one / "\x1b[31mred" / "a.png", "RGB")
    save_as(draw_shape("circle", seed=1), one / "\x1b[31mred" / "b.png", "RGB")
    save_as(draw_shape("circle"), tmp / "far" / "c.png", "RGB")
    outside = tmp / "csv" / "outside.csv"
    outside.write_text("path,label\nimg/circle-0.png,a\n../far/c.png,b\n")
    twice = make_shapes_folder(tmp / "twice", per_class=2, odd=False, corrupt=False)
    os.symlink("../circle/circle_00.jpg", twice / "square" / "same.jpg")
    digits = ["sklearn:digits", "--backbone", "test_resnet"]
    return {
        "nan": ([*digits, "--checkpoint", str(tmp / "nan.safetensors")], "'conv1.0.weight'"),
        "misfit": ([*digits, "--checkpoint", str(tmp / "vit.safetensors")], "does not fit"),
        "text": ([*digits, "--checkpoint", str(tmp / "notes.pth")], "not a PyTorch checkpoint"),
        "pickle": ([*digits, "--checkpoint", str(tmp / "evil.pth")], "carries pickled code"),
        "missing": ([*digits, "--checkpoint", str(tmp / "no\x1b[2J.pth")], "no such file"),
        "latin1": ([str(tmp / "latin1.csv"), "--backbone", "test_resnet"], "not UTF-8"),
        "one": ([str(one), "--backbone", "test_resnet"], "has one class '\\x1b[31mred'"),
        "outside": ([str(outside), "--backbone", "test_resnet"], "line 3: path '../far/c.png'"),
        "twice": ([str(twice), "--backbone", "test_resnet"], "same file"),
        "mode": ([str(folder), "--backbone", "test_resnet", "--fingerprint", "x"], "stat"),
        "csv ok": ([str(csv_path), "--backbone", "nope_net"], "nope_net"),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    return tmp, _bad_inputs(tmp)


_BAD = ["nan", "misfit", "text", "pickle", "missing", "latin1", "one", "outside", "twice", "mode"]


@pytest.mark.parametrize("name", [*_BAD, "csv ok"])
def test_bad_input_is_refused_on_one_line_before_any_flow(bad_inputs, name, capsys, no_flow):
    tmp, cases = bad_inputs
    argv, needle = cases[name]
    root = tmp / f"stores-{name}"
    line = _assert_refused(capsys, ["embed", *argv, "--root", str(root)], needle)
    if name in ("nan", "pickle", "text"):
        assert "--precision" not in line and "weights_only" not in line
    if name == "pickle":
        assert "safetensors" in line
    assert not root.exists()


def test_allow_outside_paths_and_fingerprint_reach_the_settings(tmp_path):
    from image_factory import draw_shape, make_csv_manifest, save_as

    from flows.cli import build_parser, embed_settings_from_args
    from pipeline.embed.run import check_settings

    csv_path = make_csv_manifest(tmp_path / "csv", per_class=3)
    save_as(draw_shape("circle"), tmp_path / "far" / "c.png", "RGB")
    with csv_path.open("a") as f:
        f.write("../far/c.png,box,train\n")
    argv = ["embed", str(csv_path), "--backbone", "test_resnet", "--root", str(tmp_path / "s")]
    args = build_parser().parse_args([*argv, "--allow-outside-paths", "--fingerprint", "content"])
    settings = embed_settings_from_args(args)
    assert settings.allow_outside_paths and settings.fingerprint == "content"
    plan = check_settings(settings)
    assert plan.identity.extra["fingerprint"] == "content" and plan.source.outside_paths
    default = embed_settings_from_args(build_parser().parse_args(argv))
    assert default.fingerprint == "stat" and not default.allow_outside_paths


def test_embed_help_says_what_the_default_fingerprint_checks(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fingerprint {stat,content}" in text
    assert "Default stat: each file's size and mtime" in text
    assert "--allow-outside-paths" in text


def test_summaries_escape_control_characters(capsys):
    from flows.cli import _print_embed_summary
    from flows.embed import _summary_markdown
    from pipeline.embed.run import EmbedSummary

    s = EmbedSummary(
        store="/r/\x1b]0;pwned\x07/x.zarr",
        n=3,
        dim=8,
        skipped=["cat/\x1b[31mred.jpg", "cat/new\nline.png"],
        cache_hit=False,
        seconds=1.0,
        images_per_second=3.0,
        key="0" * 64,
        dataset="d",
        backbone="test_resnet",
    )
    _print_embed_summary(s.to_dict())
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[31mred.jpg" in out
    assert len(out.splitlines()) == 3 and "new\\nline.png" in out
    md = _summary_markdown(s)
    assert "\x1b" not in md and "\\x1b[31mred.jpg" in md


def test_embed_prints_a_hostile_file_name_escaped(prefect_harness, tmp_path, capsys):
    from image_factory import make_shapes_folder

    data = make_shapes_folder(tmp_path / "d", per_class=2, odd=False, corrupt=False)
    (data / "circle" / "\x1b[31mevil\x1b[0m.jpg").write_bytes(b"not a jpeg")
    argv = ["embed", str(data), "--backbone", "test_resnet", "--root", str(tmp_path / "s")]
    assert main([*argv, "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err
    assert "circle/\\x1b[31mevil\\x1b[0m.jpg" in out


def test_error_lines_escape_control_characters(tmp_path, capsys):
    """Whatever layer raised it, the one error line never carries terminal escape bytes."""
    from flows.cli import main

    for argv in (
        ["store", "info", str(tmp_path / "no\x1b[31mstore\n.zarr")],
        ["train", str(tmp_path / "s.zarr"), "--aug", "no\x1b[31mne"],  # an option's own text
    ):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2
        assert "\x1b" not in err and err.count("\n") == 1 and "\\x1b" in err
