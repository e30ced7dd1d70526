"""The ``carrot`` command line and the Prefect ``embed`` flow (real flow runs, test server)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import main
from stores import open_store


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit code and streams as a user sees)."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["embed", "/no/such/folder", "--backbone", "test_resnet"], "/no/such/folder"),
        (["embed", "sklearn:digits", "--backbone", "resnet_18x"], "resnet_18x"),
        (
            ["embed", "sklearn:digits", "--backbone", "test_resnet", "--batch-size", "0"],
            "--batch-size",
        ),
        (
            ["embed", "sklearn:digits", "--backbone", "test_resnet", "--checkpoint", "/nope.pth"],
            "--checkpoint",
        ),
        (["embed", "sklearn:digits", "--backbone", "test_resnet", "--pretrained"], "--checkpoint"),
        (["embed", "sklearn:digits"], "--backbone"),
        (["store", "verify", "/no/store.zarr"], "/no/store.zarr"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


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
    from pipeline.embed import open_plan_writer, plan_embedding, resolve_settings_source

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
