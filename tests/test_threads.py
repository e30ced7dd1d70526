"""The thread policy (`pipeline.threads`): its choice by size, the user's count winning, and torch's
thread count restored after training (also when training raises). Nothing here is timed."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import pipeline.heads.fewshot as fewshot
import pipeline.heads.search as search
import pipeline.threads as threads
from pipeline.defaults import TrainConfig
from pipeline.errors import InputError
from pipeline.heads.features import FeatureSet
from pipeline.heads.probe import ProbeSettings, build_grid, run_probe
from pipeline.threads import (
    THREADS_FROM_WORK,
    available_threads,
    step_work,
    thread_policy,
    threads_for,
    torch_threads,
)


@pytest.fixture
def seven_available(monkeypatch):
    """Pretend the machine offers 7 threads (the policy's 'all available')."""
    monkeypatch.setattr(threads, "available_threads", lambda: 7)


def _tiny(n: int = 60, dim: int = 8, classes: int = 3) -> FeatureSet:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    X = (rng.standard_normal((classes, dim))[y] + rng.standard_normal((n, dim))).astype(np.float32)
    return FeatureSet.from_arrays({"train": (X[: n - 15], y[: n - 15]), "test": (X[-15:], y[-15:])})


# --------------------------------------------------------------------------- the choice


def test_small_steps_run_on_one_thread_large_on_all(seven_available):
    assert threads_for(0) == 1
    assert threads_for(step_work(1257, 64, 13, 10)) == 1  # digits pixels, the bank
    assert threads_for(np.nextafter(THREADS_FROM_WORK, 0)) == 1
    assert threads_for(THREADS_FROM_WORK) == 7
    assert threads_for(step_work(6000, 768, 13, 200)) == 7  # CUB-sized features
    assert threads_for(math.inf) == 7


def test_an_unknown_size_runs_on_one_thread(seven_available):
    assert threads_for(math.nan) == 1


@pytest.mark.parametrize("work", [0.0, 1e6, THREADS_FROM_WORK, 1e12, math.nan])
@pytest.mark.parametrize("requested", [1, 2, 5, 64])
def test_the_requested_count_always_wins(seven_available, work, requested):
    assert threads_for(work, requested) == requested


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.0, "2"])
def test_a_bad_requested_count_is_refused(bad):
    with pytest.raises(InputError, match="positive integer"):
        threads_for(1e6, bad)


def test_step_work_is_rows_dim_heads_classes():
    assert step_work(1257, 64, 13, 10) == 1257 * 64 * 13 * 10


def test_available_threads_never_exceed_the_callers_count_or_the_cpus(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    with torch_threads(2):
        assert available_threads() == 2  # a caller that lowered the count keeps it lowered
    with torch_threads(6):
        assert available_threads() == 4  # more torch threads than CPUs we may run on
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    with torch_threads(2):
        assert available_threads() == 1


def test_the_policy_uses_the_available_threads_for_large_steps(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    with torch_threads(3):
        assert threads_for(THREADS_FROM_WORK) == 3
        assert threads_for(1e6) == 1


# --------------------------------------------------------------------------- set and restore


def test_thread_policy_sets_the_count_and_restores_it(seven_available):
    before = torch.get_num_threads()
    with torch_threads(2):
        with thread_policy(1e6) as n:
            assert n == 1 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
        with thread_policy(1e6, 3) as n:
            assert n == 3 == torch.get_num_threads()
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_thread_policy_restores_the_count_when_the_block_raises():
    with torch_threads(2):
        with pytest.raises(RuntimeError, match="boom"), thread_policy(1e6):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2


def test_on_a_gpu_the_count_is_left_alone_unless_requested():
    with torch_threads(2):
        with thread_policy(1e6, device="cuda") as n:
            assert n == 2 == torch.get_num_threads()
        with thread_policy(1e6, 3, device="cuda:0") as n:
            assert n == 3
        assert torch.get_num_threads() == 2


# --------------------------------------------------------------------------- training entries


def _spy(monkeypatch, module, name: str, *, fail: bool = False) -> list[int]:
    """Record torch's thread count inside ``module.name`` (the entry's body); optionally raise."""
    seen: list[int] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        if fail:
            raise RuntimeError("training failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_train_head_bank_trains_small_banks_on_one_thread_and_restores(monkeypatch):
    seen = _spy(monkeypatch, search, "_train_head_bank")
    grid = build_grid(ProbeSettings(augs=("none",), weight_decays=(1e-3, 1e-1)))
    with torch_threads(2):
        result = search.train_head_bank(_tiny(), grid)
        assert torch.get_num_threads() == 2
    assert seen == [1] and result.test is not None


def test_train_head_bank_takes_the_requested_count_and_restores(monkeypatch):
    seen = _spy(monkeypatch, search, "_train_head_bank")
    grid = build_grid(ProbeSettings(augs=("none",), weight_decays=(1e-2,)))
    with torch_threads(1):
        search.train_head_bank(_tiny(), grid, threads=2)
        assert torch.get_num_threads() == 1
    assert seen == [2]


def test_train_head_bank_restores_the_count_when_training_raises(monkeypatch):
    grid = build_grid(ProbeSettings(augs=("none",), weight_decays=(1e-2,)))
    with torch_threads(2):
        with pytest.raises(InputError, match="empty"):  # raised by the real body
            search.train_head_bank(_tiny(), [], threads=3)
        assert torch.get_num_threads() == 2
        seen = _spy(monkeypatch, search, "_train_head_bank", fail=True)
        with pytest.raises(RuntimeError, match="training failed"):
            search.train_head_bank(_tiny(), grid, threads=3)
        assert torch.get_num_threads() == 2
    assert seen == [3]


def test_run_fewshot_applies_the_policy_and_restores(monkeypatch):
    seen = _spy(monkeypatch, fewshot, "_run_fewshot")
    grid = build_grid(ProbeSettings(augs=("none",), weight_decays=(1e-2,)))
    with torch_threads(2):
        few = fewshot.run_fewshot(_tiny(), grid, shots=5)
        assert torch.get_num_threads() == 2
        fewshot.run_fewshot(_tiny(), grid, shots=5, threads=3)
        assert torch.get_num_threads() == 2
    assert seen == [1, 3] and len(few.runs) == 1


def test_run_fewshot_restores_the_count_when_it_raises(monkeypatch):
    grid = build_grid(ProbeSettings(augs=("none",), weight_decays=(1e-2,)))
    with torch_threads(2):
        with pytest.raises(InputError, match="fewer than 500"):  # raised by the real body
            fewshot.run_fewshot(_tiny(), grid, shots=500, threads=3)
        assert torch.get_num_threads() == 2


def test_run_probe_passes_the_settings_threads(monkeypatch):
    seen = _spy(monkeypatch, search, "_train_head_bank")
    seen_few = _spy(monkeypatch, fewshot, "_run_fewshot")
    base = ProbeSettings(augs=("none",), weight_decays=(1e-2,))
    with torch_threads(2):
        for settings in (base, dataclasses.replace(base, threads=3)):
            run_probe(_tiny(), settings)
            run_probe(_tiny(), dataclasses.replace(settings, shots=5))
            assert torch.get_num_threads() == 2
    assert seen == [1, 3] and seen_few == [1, 3]


@pytest.mark.parametrize("bad", [0, -4, 1.5, True, "auto"])
def test_probe_settings_refuse_a_bad_thread_count(bad):
    with pytest.raises(InputError, match="--threads"):
        ProbeSettings(threads=bad)


def test_probe_settings_take_a_thread_count():
    assert ProbeSettings().threads is None
    assert ProbeSettings(threads=4).threads == 4


# --------------------------------------------------------------------------- the bank's step size


def _specs(augs: tuple[str, ...], wds: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    return build_grid(ProbeSettings(augs=augs, weight_decays=wds)).specs


def test_bank_step_work_of_a_plain_bank_is_all_rows():
    specs = _specs(("none",))
    work = search.bank_step_work(specs, TrainConfig(), rows=1000, dim=64, classes=10)
    assert work == step_work(1000, 64, len(specs), 10)


def test_bank_step_work_of_a_mixed_bank_is_the_smaller_step():
    specs = _specs(("none", "carrot"))  # 5 plain heads, 5 carrot heads (one lr)
    cfg = TrainConfig(batch_size=256)  # aug_near_best=1: 3 of the 5 carrot heads are fitted
    work = search.bank_step_work(specs, cfg, rows=100_000, dim=768, classes=200)
    assert work == step_work(256, 768, 3, 200)
    every = search.bank_step_work(
        specs, TrainConfig(aug_near_best=None), rows=100_000, dim=768, classes=200
    )
    assert every == step_work(256, 768, 5, 200)


def test_bank_step_work_counts_minibatches_when_streamed_or_asked():
    specs = _specs(("none",))
    kw = {"rows": 100_000, "dim": 768, "classes": 200}
    streamed = search.bank_step_work(specs, TrainConfig(), in_memory=False, **kw)
    minibatch = search.bank_step_work(specs, TrainConfig(solver="minibatch"), **kw)
    assert streamed == minibatch == step_work(256, 768, len(specs), 200)
    small = search.bank_step_work(specs, TrainConfig(solver="minibatch"), rows=40, dim=8, classes=3)
    assert small == step_work(40, 8, len(specs), 3)  # a batch is at most the rows


def test_bank_step_work_of_no_heads_is_unknown():
    assert math.isnan(search.bank_step_work((), TrainConfig(), rows=10, dim=4, classes=2))
