"""Few-shot: k shots per class, selection inside the shots only (no leakage), seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.augment import GaussianSettings
from pipeline.errors import InputError
from pipeline.heads.bank import HeadGrid
from pipeline.heads.features import FeatureSet
from pipeline.heads.fewshot import run_fewshot, run_fewshot_seed, sample_shots, validation_folds
from pipeline.heads.train import TrainConfig

C, D = 4, 10


def _features(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((C, D)) * 2.0

    def draw(n):
        y = np.arange(n) % C
        return (means[y] + rng.standard_normal((n, D))).astype(np.float32), y

    return FeatureSet.from_arrays({"train": draw(200), "val": draw(80), "test": draw(80)})


GRID = HeadGrid.from_lists(
    lrs=[3e-2],
    weight_decays=[1e-3, 1e-1, 1.0],
    augmentations=[("none", None), ("gaussian", GaussianSettings())],
)
CFG = TrainConfig(epochs=10, batch_size=8, min_steps=0)


def test_sample_shots_is_seeded_and_per_class():
    y = np.repeat(np.arange(5), 7)
    a = sample_shots(y, 3, seed=1)
    assert np.array_equal(a, sample_shots(y, 3, seed=1))
    assert not np.array_equal(a, sample_shots(y, 3, seed=2))
    assert np.array_equal(np.bincount(y[a]), [3] * 5)
    assert len(set(a.tolist())) == 15
    with pytest.raises(InputError, match="lower --shots"):
        sample_shots(y, 8, seed=0)


@pytest.mark.parametrize(("shots", "n_folds"), [(1, 1), (2, 2), (4, 4), (5, 1), (10, 1)])
def test_validation_rule(shots, n_folds):
    y = np.repeat(np.arange(3), shots)
    folds = validation_folds(y, shots, seed=0)
    assert len(folds) == n_folds
    for tr, va in folds:
        if shots == 1:
            assert np.array_equal(tr, va)  # resubstitution
            continue
        assert not set(tr) & set(va)  # disjoint
        assert set(tr) | set(va) <= set(range(len(y)))
        assert len(set(np.bincount(y[va]).tolist())) == 1  # balanced
        assert (np.bincount(y[tr], minlength=3) >= 1).all()  # no class emptied
        if shots >= 5:
            assert len(va) == 3 * int(np.ceil(shots / 5))
    if 2 <= shots < 5:  # every shot validated exactly once
        assert sorted(np.concatenate([va for _, va in folds]).tolist()) == list(range(len(y)))


@pytest.mark.parametrize("shots", [3, 5])
def test_no_sample_outside_the_shots_is_used(shots):
    """Poison the features of every train row that is not a shot (labels stay: they decide
    which rows can be drawn) and the whole given val split: nothing changes."""
    fs = _features()
    clean = run_fewshot_seed(fs, GRID, CFG, shots=shots, seed=4)
    train = fs.get("train")
    keep = np.zeros(len(train), dtype=bool)
    keep[clean.shot_indices] = True
    g = torch.Generator().manual_seed(0)
    X = train.X.clone()
    X[~torch.as_tensor(keep)] = torch.randn(int((~keep).sum()), D, generator=g) * 1e3
    val = fs.get("val")
    poisoned = dataclasses.replace(
        fs,
        splits={
            **fs.splits,
            "train": dataclasses.replace(train, X=X),
            "val": dataclasses.replace(
                val, X=torch.full_like(val.X, 1e6), y=torch.zeros_like(val.y)
            ),
        },
    )
    dirty = run_fewshot_seed(poisoned, GRID, CFG, shots=shots, seed=4)
    assert np.array_equal(dirty.shot_indices, clean.shot_indices)
    assert dirty.selection == clean.selection
    assert dirty.best_index == clean.best_index and dirty.refit == clean.refit
    assert dirty.test == clean.test
    assert clean.test["top1"] > 0.6  # a real run: well above chance (0.25)
    for k, v in clean.head.state_dict().items():
        assert torch.equal(dirty.head.state_dict()[k], v)


def test_several_seeds_give_mean_and_std():
    fs = _features()
    r = run_fewshot(fs, GRID, CFG, shots=2, seeds=[0, 1, 2])
    assert [run.seed for run in r.runs] == [0, 1, 2]
    assert r.mean.keys() == r.std.keys() == {k for k in r.runs[0].test if k != "n"}
    for key in r.mean:  # population std (ddof=0) over the seeds, for every test metric
        values = [run.test[key] for run in r.runs]
        assert r.mean[key] == pytest.approx(np.mean(values)), key
        assert r.std[key] == pytest.approx(np.std(values)), key
    assert len({run.test["top1"] for run in r.runs}) > 1  # seeds differ: the std is not 0
    assert r.mean["top1"] > 0.5  # well-separated classes: even 2 shots beat chance (0.25)
    summary = r.summary()
    assert summary["shots"] == 2 and len(summary["runs"]) == 3
    chosen = [run.best_spec for run in r.runs]
    assert chosen.count(r.best_spec()) == max(chosen.count(s) for s in chosen)
    assert summary["best_spec"] == r.best_spec().to_dict()


def test_one_shot_runs_with_resubstitution():
    r = run_fewshot(_features(), GRID, CFG, shots=1, seeds=[0])
    assert r.runs[0].test is not None and r.runs[0].refit["steps"] >= 1


def test_the_refit_is_the_procedure_that_was_scored():
    """The chosen head is refitted on all shots with the same settings that scored it: the
    same solver, to convergence, no epoch count carried over from the selection runs."""
    fs = _features()
    run = run_fewshot_seed(fs, GRID, CFG, shots=5, seed=0)
    assert run.refit["solver"] == run.selection[run.best_index]["solver"]
    assert run.refit["converged"] or run.refit["solver"] == "minibatch"
