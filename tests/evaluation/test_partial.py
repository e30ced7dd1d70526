"""The partially frozen quality regime (``carrot bench quality --partial``): every method trains
the same top from the same start on the same seeded rows, results pair against plain, runs are
deterministic, and settings that cannot run are one-line errors."""

from __future__ import annotations

import json

import pytest

from pipeline.embed.backbone import BackboneConfig
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding
from pipeline.errors import InputError
from pipeline.evaluation.partial import PartialConfig, epochs_for, run_partial
from pipeline.evaluation.protocol import summarize
from stores import open_store


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    settings = EmbedSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name="test_vit", image_size=32, cache_at=2),
        extract=ExtractConfig(batch_size=128, num_workers=0),
        root=str(tmp_path_factory.mktemp("partial")),
    )
    return open_store(run_embedding(settings).store)


def test_methods_pair_against_plain_on_the_same_rows(cache):
    cfg = PartialConfig(
        blocks=(1,),
        methods=("carrot-sample", "gaussian"),
        shots=(4, None),
        seeds=(0, 1),
        epochs=2,
        min_steps=20,
    )
    records = run_partial(cache, cfg, dataset="d")
    assert len(records) == 1 * 2 * 2 * 3
    assert {r.method for r in records} == {"plain", "carrot-sample", "gaussian"}
    few = [r for r in records if r.shots == 4]
    assert all(r.chosen["epochs"] == epochs_for(cfg, 40) == 20 for r in few)  # 40 rows, 1 step
    assert all(r.chosen["augmented_rows"] > 0 for r in records if r.method != "plain")
    assert all(r.chosen["augmented_rows"] == 0 for r in records if r.method == "plain")
    rows = summarize(records)
    plain = [r for r in rows if r["method"] == "plain"]
    assert len(plain) == 2 and all(r["diff_vs_plain"] == 0.0 for r in plain)
    full = {r["method"]: r for r in rows if r["shots"] == "all"}
    assert full["plain"]["top1"] > 0.5  # the top learns on all rows
    again = run_partial(cache, cfg, dataset="d")  # seeded: the same numbers
    assert [r.top1 for r in again] == [r.top1 for r in records]


def test_settings_that_cannot_run_are_refused(cache):
    with pytest.raises(InputError, match="do not run in the partially frozen regime"):
        PartialConfig(methods=("logreg",))
    with pytest.raises(InputError, match="--cache-at block:-3"):
        run_partial(cache, PartialConfig(blocks=(3,)), dataset="d")


def test_bench_quality_partial_on_a_user_cache(cache, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "q"
    args = ["bench", "quality", "--partial", "--no-builtin", "--store", cache.url]
    opts = ["--shots", "8", "--seeds", "2", "--methods", "plain,isda", "--out", str(out)]
    assert main([*args, *opts, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["dataset"].split(", ")[-1], r["method"], r["seeds"]) for r in rows} == {
        (f"top {n} block{'s' if n > 1 else ''} trainable", m, 2)
        for n in (1, 2)
        for m in ("plain", "isda")
    }
    assert len(json.loads((out / "quality.json").read_text())["records"]) == 2 * 2 * 2
    assert main([*args, "--shots", "500"]) == 2
    assert "has a class with" in capsys.readouterr().err
