"""Head-bank training: L-BFGS plain heads at scikit-learn's optimum, minibatch heads equal to
independently trained heads, convergence, two-stage search, selection, streaming, outputs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from pipeline.augment import DCSettings, GaussianSettings, IsdaSettings, MixupSettings
from pipeline.augment.carrot import CarrotConfig
from pipeline.defaults import INIT_STD, LbfgsSettings
from pipeline.errors import InputError
from pipeline.heads.bank import Head, HeadBank, HeadGrid, HeadSpec
from pipeline.heads.baseline import BaselineConfig, fit_logistic_baseline, layernorm_rows
from pipeline.heads.features import FeatureSet, StreamingFeatures
from pipeline.heads.io import load_head, write_outputs
from pipeline.heads.lbfgs import softmax_objective
from pipeline.heads.optim import lr_at
from pipeline.heads.predict import predict
from pipeline.heads.probe import ProbeSettings, run_probe
from pipeline.heads.search import train_head_bank
from pipeline.heads.train import TrainConfig, fit_bank, scale_for_min_steps, windowed_converged


def gaussian_data(n=240, d=12, c=4, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((c, d)) * spread
    y = rng.integers(0, c, n)
    X = (means[y] + rng.standard_normal((n, d)) + 3.0).astype(np.float32)
    return X, y


def gaussian_set(seed=0, **kw):
    X, y = gaussian_data(seed=seed, **kw)
    Xv, yv = gaussian_data(n=120, seed=seed, **kw)  # same means (same seed), new noise rows
    Xt, yt = gaussian_data(n=120, seed=seed, **kw)
    rng = np.random.default_rng(seed + 7)
    Xv = Xv + rng.standard_normal(Xv.shape).astype(np.float32) * 0.5
    Xt = Xt + rng.standard_normal(Xt.shape).astype(np.float32) * 0.5
    return FeatureSet.from_arrays({"train": (X, y), "val": (Xv, yv), "test": (Xt, yt)})


def digits_set(seed=0):
    X, y = load_digits(return_X_y=True)
    p = np.random.default_rng(seed).permutation(len(y))
    X, y = X[p].astype(np.float32), y[p]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return FeatureSet.from_arrays(
        {"train": (X[:a], y[:a]), "val": (X[a:b], y[a:b]), "test": (X[b:], y[b:])}
    )


def standardized_ln(X_train, X):
    """The heads' input space, computed independently: LN rows, then train z-scores."""
    Z = layernorm_rows(X_train)
    mu, var = Z.mean(0), Z.var(0)
    var = var + 1e-6 * var.mean() + 1e-12
    return (layernorm_rows(X) - mu) / np.sqrt(var)


MINIBATCH = TrainConfig(solver="minibatch", min_steps=0, tol=0.0)  # no early stop


def reference_head(X, y, spec: HeadSpec, cfg: TrainConfig) -> Head:
    """One head trained alone with plain PyTorch modules (no bank code): Adam/SGD with coupled
    L2 on the weight, LayerNorm affine frozen at the standardizing affine."""
    N, D = X.shape
    C = int(y.max()) + 1
    head = Head(D, C)
    Z = layernorm_rows(X)
    mu, var = Z.mean(0), Z.var(0)
    var = var + 1e-6 * var.mean() + 1e-12
    with torch.no_grad():
        g = torch.Generator().manual_seed(spec.seed)
        head.fc.weight.copy_(torch.randn(C, D, generator=g) * INIT_STD)
        head.fc.bias.zero_()
        head.norm.weight.copy_(torch.as_tensor(1 / np.sqrt(var)))
        head.norm.bias.copy_(torch.as_tensor(-mu / np.sqrt(var)))
    head.norm.requires_grad_(False)
    groups = [
        {"params": [head.fc.weight], "weight_decay": spec.weight_decay},
        {"params": [head.fc.bias], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.Adam(groups, lr=spec.lr)
    ls = cfg.label_smoothing if spec.label_smoothing is None else spec.label_smoothing
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(N / cfg.batch_size)
    total, warm = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    step = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(N, generator=shuffle)
        for start in range(0, N, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = spec.lr * lr_at(step, total_steps=total, warmup_steps=warm)
            loss = F.cross_entropy(head(Xt[idx]), yt[idx], label_smoothing=ls)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return head


def test_lbfgs_heads_reach_the_scikit_learn_optimum():
    """Plain heads solve exactly scikit-learn's multinomial logistic regression on the
    standardized LN features (C = 1/(λN)): same objective value, same predictions."""
    X, y = gaussian_data(n=300, d=20, c=5, spread=0.6)
    fs = FeatureSet.from_arrays({"train": (X, y)})
    lams = [1e-4, 1e-2, 1.0]
    specs = [HeadSpec(lr=1e-3, weight_decay=lam) for lam in lams]
    cfg = TrainConfig(lbfgs=LbfgsSettings(gtol=1e-7, max_iter=3000))
    out = fit_bank(fs, specs, cfg, val_split=None)
    Z = standardized_ln(X, X)
    for h, lam in enumerate(lams):
        assert out.status[h]["solver"] == "lbfgs" and out.status[h]["converged"]
        ref = LogisticRegression(C=1 / (lam * len(y)), tol=1e-10, max_iter=20000).fit(Z, y)
        f_ref, _, _ = softmax_objective(
            torch.as_tensor(Z),
            torch.as_tensor(y),
            torch.as_tensor(ref.coef_)[None],
            torch.as_tensor(ref.intercept_)[None],
            torch.tensor([lam], dtype=torch.float64),
            torch.zeros(1, dtype=torch.float64),
            with_grad=False,
        )
        assert out.status[h]["objective"] == pytest.approx(float(f_ref[0]), rel=1e-5, abs=1e-6)
        pred, _ = predict(out.bank.head(h), X)
        assert (pred == ref.predict(Z)).mean() >= 0.99


def test_lbfgs_reports_heads_that_did_not_converge():
    X, y = gaussian_data(n=200, d=16, c=4, spread=0.3)
    fs = FeatureSet.from_arrays({"train": (X, y)})
    specs = [HeadSpec(weight_decay=1e-6), HeadSpec(weight_decay=1.0)]
    short = fit_bank(fs, specs, TrainConfig(lbfgs=LbfgsSettings(max_iter=3)), val_split=None)
    assert [s["converged"] for s in short.status] == [False, False]
    assert [s["steps"] for s in short.status] == [3, 3]
    full = fit_bank(fs, specs, TrainConfig(), val_split=None)
    assert all(s["converged"] for s in full.status)
    assert all(s["steps"] > 3 for s in full.status)


def test_augmented_heads_start_from_the_plain_solution_of_their_lambda():
    """An augmented head whose extra term weighs nothing has the plain objective: started at
    its optimum, minibatch training stays there."""
    fs = gaussian_set()
    still = GaussianSettings(sigma=0.3, aug_weight=0.0)
    specs = [
        HeadSpec(weight_decay=1e-2),
        HeadSpec(lr=1e-4, weight_decay=1e-2, aug="gaussian", aug_settings=still),
    ]
    out = fit_bank(fs, specs, TrainConfig(epochs=3, min_steps=0), val_split="val")
    assert out.status[0]["solver"] == "lbfgs" and out.status[1]["solver"] == "minibatch"
    torch.testing.assert_close(out.bank.weight[1], out.bank.weight[0], rtol=0, atol=2e-3)
    assert out.val[1]["balanced_accuracy"] == pytest.approx(
        out.val[0]["balanced_accuracy"], abs=0.02
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_bank_equals_independently_trained_heads(optimizer):
    X, y = gaussian_data(n=200, d=10, c=4)
    fs = FeatureSet.from_arrays({"train": (X, y)})
    specs = [
        HeadSpec(lr=1e-2, weight_decay=0.0, seed=0),
        HeadSpec(lr=3e-2, weight_decay=0.1, seed=1),
        HeadSpec(lr=1e-3, weight_decay=1.0, label_smoothing=0.1, seed=2),
        HeadSpec(lr=5e-2, weight_decay=0.01, seed=0),
    ]
    cfg = dataclasses.replace(MINIBATCH, optimizer=optimizer, epochs=3, batch_size=32)
    bank = fit_bank(fs, specs, cfg, val_split=None).bank
    for h, spec in enumerate(specs):
        ref = reference_head(X, y, spec, cfg)
        got = bank.head(h)
        for name, p in ref.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], p, rtol=1e-4, atol=1e-5)


def test_bank_with_mixed_augmentations_equals_single_spec_banks():
    X, y = gaussian_data(n=160, d=10, c=5)
    fs = FeatureSet.from_arrays({"train": (X, y)})
    specs = [
        HeadSpec(lr=1e-2),
        HeadSpec(lr=1e-2, aug="gaussian", aug_settings=GaussianSettings(sigma=0.3)),
        HeadSpec(lr=3e-2, aug="gaussian", aug_settings=GaussianSettings(sigma=0.3), seed=1),
        HeadSpec(lr=1e-2, aug="mixup", aug_settings=MixupSettings(alpha=0.4)),
        HeadSpec(lr=1e-2, aug="isda", aug_settings=IsdaSettings(rank=3)),
        HeadSpec(lr=1e-2, aug="dc", aug_settings=DCSettings(k=2, rank=3)),
        HeadSpec(lr=1e-2, aug="carrot", aug_settings=CarrotConfig(topk=2)),
        HeadSpec(lr=3e-2, aug="carrot", aug_settings=CarrotConfig(topk=2), seed=2),
        HeadSpec(lr=1e-2, aug="carrot", aug_settings=CarrotConfig(topk=2, injection="pre_ln")),
        HeadSpec(lr=1e-2, aug="carrot", aug_settings=CarrotConfig(topk=2, noise="class_cov")),
    ]
    cfg = dataclasses.replace(MINIBATCH, epochs=2, batch_size=40)
    bank = fit_bank(fs, specs, cfg, val_split=None).bank
    for h, spec in enumerate(specs):
        alone = fit_bank(fs, [spec], cfg, val_split=None).bank
        torch.testing.assert_close(bank.weight[h], alone.weight[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank.bias[h], alone.bias[0], rtol=1e-4, atol=1e-5)
    # the augmentations did something: the gaussian head differs from the plain one
    assert not torch.allclose(bank.weight[0], bank.weight[1], atol=1e-4)


@pytest.mark.parametrize("topk", [2, 4])  # 4 = C − 1: every class competes (shared basis)
def test_carrot_heads_trained_together_equal_the_head_by_head_loop(monkeypatch, topk):
    """The bank augments a CARROT group all at once (`carrot_augment_heads`); the same bank
    with that path switched off (head-by-head `carrot_augment`) trains the same heads."""
    from pipeline.augment.registry import CarrotAugmentation

    fs = FeatureSet.from_arrays({"train": gaussian_data(n=160, d=10, c=5)})
    carrot = CarrotConfig(topk=topk, aug_per_sample=2)
    specs = [
        HeadSpec(lr=lr, weight_decay=wd, aug="carrot", aug_settings=carrot, seed=s)
        for lr, wd, s in [(1e-2, 0.0, 0), (3e-2, 1e-3, 1), (1e-2, 1e-2, 2)]
    ]
    cfg = dataclasses.replace(MINIBATCH, epochs=3, batch_size=40)
    together = fit_bank(fs, specs, cfg, val_split=None)
    monkeypatch.setattr(CarrotAugmentation, "augment_heads", lambda self, *a: None)
    loop = fit_bank(fs, specs, cfg, val_split=None)
    torch.testing.assert_close(together.bank.weight, loop.bank.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.bank.bias, loop.bank.bias, rtol=1e-4, atol=1e-5)
    for a, b in zip(together.diagnostics, loop.diagnostics, strict=True):
        assert a.keys() == b.keys()
        for h in a:
            assert a[h] == pytest.approx(b[h], rel=1e-4, abs=1e-6)


def test_carrot_heads_log_diagnostics():
    fs = gaussian_set()
    spec = HeadSpec(lr=3e-2, aug="carrot", aug_settings=CarrotConfig(topk=2))
    cfg = TrainConfig(epochs=3, batch_size=32, min_steps=0, aug_warmup_epochs=1, tol=0.0)
    r = train_head_bank(fs, [HeadSpec(lr=3e-2), spec], cfg)
    assert r.diagnostics[0] == {}  # warm-up epoch: no augmentation
    later = r.diagnostics[-1][1]
    assert 0.0 < later["frac_augmented"] <= 1.0
    assert later["violation_rate"] <= 0.2


@settings(deadline=None, max_examples=60)
@given(
    total=st.integers(1, 400),
    warm_frac=st.floats(0.0, 1.0),
    min_ratio=st.floats(0.0, 0.5),
)
def test_lr_schedule_warmup_then_cosine(total, warm_frac, min_ratio):
    warm = int(warm_frac * total)
    lrs = [
        lr_at(s, total_steps=total, warmup_steps=warm, min_ratio=min_ratio) for s in range(total)
    ]
    assert all(0.0 < v <= 1.0 + 1e-12 for v in lrs)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warm]))  # rising
    post = lrs[warm:]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(post))  # then falling
    if post:
        assert post[0] == pytest.approx(1.0)
        assert min(post) > min_ratio or min_ratio == 1.0
        end = lr_at(total, total_steps=total, warmup_steps=warm, min_ratio=min_ratio)
        assert end == pytest.approx(min_ratio)


@settings(deadline=None, max_examples=60)
@given(
    values=st.lists(st.floats(0.1, 10.0), min_size=0, max_size=30),
    window=st.integers(1, 6),
    tol=st.floats(0.0, 0.1),
)
def test_windowed_convergence_rule(values, window, tol):
    done = windowed_converged(values, tol=tol, window=window)
    if len(values) < 2 * window:
        assert not done
    else:
        recent, before = np.mean(values[-window:]), np.mean(values[-2 * window : -window])
        assert done == (abs(before - recent) <= tol * abs(recent))
    assert windowed_converged([1.0] * (2 * window), tol=0.0, window=window)


def test_minibatch_heads_stop_when_their_objective_settles():
    fs = gaussian_set()
    specs = [HeadSpec(lr=3e-2, weight_decay=1e-2)]
    cfg = TrainConfig(solver="minibatch", epochs=200, min_steps=0, tol=1e-3, window=3)
    out = fit_bank(fs, specs, cfg, val_split="val")
    (fast,) = out.status
    assert fast["solver"] == "minibatch" and fast["converged"]
    assert fast["steps"] < 200 * math.ceil(240 / cfg.batch_size)  # stopped early
    curve = np.asarray(out.curves["train_loss"])[:, 0]
    curve = curve[np.isfinite(curve)]
    assert curve[-1] < curve[0]
    never = fit_bank(fs, specs[:1], dataclasses.replace(cfg, epochs=12, tol=0.0), val_split=None)
    assert not never.status[0]["converged"] and never.epochs_run == 12


def test_two_stage_search_trains_augmented_heads_near_the_best_plain_lambda(monkeypatch):
    import pipeline.heads.train as train_module

    solves = []
    real = train_module.solve_softmax_lbfgs
    monkeypatch.setattr(
        train_module, "solve_softmax_lbfgs", lambda *a, **k: solves.append(1) or real(*a, **k)
    )
    fs = gaussian_set()
    lams = [1e-5, 1e-3, 1e-1, 10.0]
    grid = HeadGrid.from_lists(
        lrs=[1e-2],
        weight_decays=lams,
        augmentations=[("none", None), ("gaussian", GaussianSettings())],
    )
    cfg = TrainConfig(epochs=2, min_steps=0)
    r = train_head_bank(fs, grid, cfg)
    plain = [v for s, v in zip(r.specs, r.val, strict=True) if s.aug == "none"]
    best_lam = lams[max(range(4), key=lambda i: (plain[i]["balanced_accuracy"], -plain[i]["loss"]))]
    i = lams.index(best_lam)
    near = set(lams[max(0, i - 1) : i + 2])
    trained = {s.weight_decay for s in r.specs if s.aug == "gaussian"}
    assert trained == near and r.skipped == 4 - len(near)
    assert len(solves) == 1  # stage 2 starts from stage 1's solutions, no second solve
    everything = train_head_bank(fs, grid, dataclasses.replace(cfg, aug_near_best=None))
    assert len(everything.specs) == 8 and everything.skipped == 0


def test_selection_prefers_the_plain_head_on_an_accuracy_tie():
    from pipeline.heads.train import select_best

    val = [
        {"balanced_accuracy": 0.9, "loss": 0.30},  # plain
        {"balanced_accuracy": 0.9, "loss": 0.25},  # augmented, lower loss: still second
        {"balanced_accuracy": 0.8, "loss": 0.10},
    ]
    assert select_best(val) == 1  # without the flags: the lower loss
    assert select_best(val, [False, True, False]) == 0
    val[1]["balanced_accuracy"] = 0.91  # an augmentation that is more accurate wins
    assert select_best(val, [False, True, False]) == 1


def test_accuracies_equal_but_for_float_rounding_are_a_tie_broken_by_the_loss():
    """Balanced accuracy is a float32 mean of per-class recalls: the same recalls summed in
    another class order differ in the last bits. That is a tie: the lower loss wins."""
    from pipeline.heads.train import select_best

    recalls = torch.tensor([16 / 18, 17 / 19, 15 / 17, 18 / 18, 14 / 19, 13 / 17])
    a, b = float(recalls.mean()), float(recalls.flip(0).mean())
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    c = float(recalls[perm].mean())
    assert len({a, b, c}) > 1  # the same recalls, different floats
    val = [
        {"balanced_accuracy": max(a, b, c), "loss": 2.9},
        {"balanced_accuracy": min(a, b, c), "loss": 1.8},
    ]
    assert select_best(val) == 1
    val[1]["balanced_accuracy"] -= 1e-4  # a real difference still decides
    assert select_best(val) == 0


def test_an_augmented_head_must_beat_plain_by_one_standard_error():
    """With the validation row count known, p = 0.8 on n = 400 rows has a standard error of
    0.02: an augmented head 0.015 ahead is noise (plain kept), 0.025 ahead wins; plain heads
    among themselves still take the plain maximum."""
    from pipeline.heads.train import select_best

    def scores(aug_acc: float) -> list[dict[str, float]]:
        return [
            {"balanced_accuracy": 0.79, "loss": 0.2, "rows": 400},  # plain
            {"balanced_accuracy": 0.80, "loss": 0.3, "rows": 400},  # plain, the best one
            {"balanced_accuracy": aug_acc, "loss": 0.1, "rows": 400},  # augmented
        ]

    flags = [False, False, True]
    assert select_best(scores(0.815), flags) == 1
    assert select_best(scores(0.825), flags) == 2
    assert select_best(scores(0.815)) == 2  # no augmentation flags: the plain maximum
    no_rows = [{k: v for k, v in s.items() if k != "rows"} for s in scores(0.815)]
    assert select_best(no_rows, flags) == 2  # without the row count: the maximum
    only_aug = scores(0.815)[2:]
    assert select_best(only_aug, [True]) == 0


def test_selection_never_looks_at_test():
    fs = gaussian_set()
    grid = HeadGrid.from_lists(
        lrs=[1e-2],
        weight_decays=[1e-4, 1e-2, 1.0],
        augmentations=[("none", None), ("gaussian", GaussianSettings())],
    )
    cfg = TrainConfig(epochs=4, batch_size=32, min_steps=0)
    clean = train_head_bank(fs, grid, cfg)
    poisoned = dataclasses.replace(fs, splits=dict(fs.splits))
    test = fs.splits["test"]
    g = torch.Generator().manual_seed(9)
    poisoned.splits["test"] = dataclasses.replace(
        test,
        X=torch.randn(test.X.shape, generator=g) * 100,
        y=torch.randint(0, 4, test.y.shape, generator=g),
    )
    dirty = train_head_bank(poisoned, grid, cfg)
    assert dirty.best_index == clean.best_index
    assert dirty.val == clean.val
    assert dirty.test["top1"] != clean.test["top1"]  # the test split really changed


def test_validation_carved_class_balanced_when_missing():
    X, y = gaussian_data(n=300, c=5)
    fs = FeatureSet.from_arrays({"train": (X, y)}).with_validation(fraction=0.2, seed=0)
    counts = np.bincount(fs.get("val").y.numpy())
    assert len(set(counts.tolist())) == 1 and counts[0] >= 1
    assert len(fs.get("train")) + len(fs.get("val")) == 300
    r = train_head_bank(FeatureSet.from_arrays({"train": (X, y)}), [HeadSpec()], TrainConfig())
    assert r.test is None and 0.0 <= r.val[0]["balanced_accuracy"] <= 1.0


def test_streaming_single_chunk_equals_in_memory():
    X, y = gaussian_data(n=150, d=8, c=3)
    mem = FeatureSet.from_arrays({"train": (X, y)})
    stream = FeatureSet.from_arrays({"train": (X[:1], y[:1])}, class_names=["a", "b", "c"])
    del stream.splits["train"]
    stream.streams["train"] = StreamingFeatures.from_arrays(X, y, block_rows=10_000)
    cfg = dataclasses.replace(MINIBATCH, epochs=2, batch_size=32)
    a = fit_bank(mem, [HeadSpec(lr=1e-2)], cfg, val_split=None).bank
    b = fit_bank(stream, [HeadSpec(lr=1e-2)], cfg, val_split=None).bank
    torch.testing.assert_close(a.weight, b.weight)


def test_streaming_chunks_cover_every_row_once_per_epoch():
    X, y = gaussian_data(n=103, d=4, c=3)
    X[:, 0] = np.arange(103)  # row id in column 0
    s = StreamingFeatures.from_arrays(X, y, block_rows=17, buffer_blocks=2, prefetch=2)
    seen = []
    for xb, _yb in s.batches(
        10, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    ):
        assert len(xb) <= 10
        seen.extend(xb[:, 0].long().tolist())
    assert sorted(seen) == list(range(103))


def test_streamed_batches_mix_classes_of_a_class_sorted_split():
    """Stores sort rows by class; streaming shuffles across the whole split, not per block."""
    C, per_class, block = 40, 50, 100
    y = np.repeat(np.arange(C), per_class)
    X = np.zeros((len(y), 2), np.float32)
    s = StreamingFeatures.from_arrays(X, y, block_rows=block, buffer_blocks=8)
    g = torch.Generator().manual_seed(0)
    distinct = [
        len(set(yb.tolist())) for _, yb in s.batches(64, generator=g, device=torch.device("cpu"))
    ]
    # one block holds 2 classes; 8 random blocks of 20: a batch of 64 sees ~13 classes
    assert np.mean(distinct[:-1]) >= 10


def test_streaming_reader_errors_reach_the_trainer():
    def read(i):
        if i == 1:
            raise OSError("disk gone")
        return np.zeros((5, 4), np.float32), np.zeros(5, np.int64)

    s = StreamingFeatures(read, n_blocks=2, num_rows=10, dim=4)
    with pytest.raises(OSError, match="disk gone"):
        list(s.batches(2, generator=None, device=torch.device("cpu"), shuffle=False))


def test_streamed_training_over_a_multi_chunk_store_matches_in_memory(tmp_path):
    """A class-sorted store of 15 chunks, streamed (minibatch Adam warm-started by L-BFGS on a
    sample), reaches the in-memory L-BFGS optimum: objective within 2 %, test top-1 within
    2 points."""
    from stores import open_store
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    data = synthetic_data(1200, dim=16, n_classes=6, skip_every=0, seed=3)
    order = np.argsort(data.labels, kind="stable")  # sorted by class, as stores are
    data = dataclasses.replace(
        data,
        ids=[data.ids[i] for i in order],
        labels=data.labels[order],
        split=[data.split[i] for i in order],
        features=data.features[order],
        valid=data.valid[order],
        errors=[data.errors[i] for i in order],
    )
    url = write_synthetic_store(str(tmp_path / "s"), data, synthetic_identity(data), chunk_rows=80)
    store = open_store(url)
    spec = [HeadSpec(weight_decay=1e-2)]
    cfg = TrainConfig(warm_start_rows=60)
    mem = train_head_bank(FeatureSet.from_store(store), spec, cfg)
    streamed_fs = FeatureSet.from_store(store, max_bytes=0, block_rows=80)
    assert "train" in streamed_fs.streams and streamed_fs.streams["train"].n_blocks > 1
    streamed = train_head_bank(streamed_fs, spec, cfg)
    assert mem.val[0]["solver"] == "lbfgs" and streamed.val[0]["solver"] == "minibatch"
    assert streamed.val[0]["objective"] == pytest.approx(mem.val[0]["objective"], rel=0.02)
    assert abs(streamed.test["top1"] - mem.test["top1"]) <= 0.02


def test_outputs_written_and_head_reloads_identically(tmp_path):
    fs = gaussian_set()
    r = train_head_bank(fs, [HeadSpec(weight_decay=1e-3), HeadSpec(weight_decay=1e-1)])
    names = ["a", "b", "c", "d"]
    paths = write_outputs(r, tmp_path, class_names=names, store_key="k123", store_url="memory://x")
    for f in [
        "head.safetensors",
        "config.json",
        "metrics.json",
        "predictions.csv",
        "learning_curves.png",
        "confusion.png",
    ]:
        assert (tmp_path / f).stat().st_size > 0, f
    assert set(paths) >= {
        "head",
        "config",
        "metrics",
        "predictions",
        "learning_curves",
        "confusion",
    }
    head, config = load_head(tmp_path)
    assert config["class_names"] == names and config["store"]["key"] == "k123"
    assert HeadSpec.from_dict(config["spec"]) == r.best_spec
    X = fs.get("test").X
    pred_a, probs_a = predict(r.best_head(), X)
    pred_b, probs_b = predict(head, X)
    np.testing.assert_array_equal(pred_a, pred_b)
    np.testing.assert_allclose(probs_a, probs_b, rtol=0, atol=1e-7)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["top1"] == pytest.approx(r.test["top1"])
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,label,pred,prob,top5,top5_probs" and len(lines) == 121


def test_bfloat16_autocast_trains():
    fs = gaussian_set()
    cfg = dataclasses.replace(MINIBATCH, epochs=5, dtype="bfloat16")
    r = train_head_bank(fs, [HeadSpec(lr=3e-2)], cfg)
    assert r.test["top1"] > 0.8


def test_device_mismatch_and_bad_config_are_input_errors():
    fs = gaussian_set()
    with pytest.raises(InputError):
        TrainConfig(optimizer="adamw")
    with pytest.raises(InputError):
        TrainConfig(solver="newton")
    with pytest.raises(InputError):
        train_head_bank(fs, [HeadSpec()], TrainConfig(device="meta"))


def test_probe_defaults_match_logistic_regression_on_digits():
    """On digits pixels, the default probe (plain heads only) within 0.5 point of the best-C
    logistic regression of the same model class (LN rows, then z-scores) on the same splits.
    (Against StandardScaler'd pixels, see benchmarks/probe_parity.py.)"""
    fs = digits_set()
    ours = run_probe(fs, ProbeSettings(augs=("none",)))
    lr = fit_logistic_baseline(fs, BaselineConfig(preprocess="layernorm"))
    assert ours.summary["top1"] >= lr.test["top1"] - 0.005, (ours.summary, lr.test)
    assert ours.summary["converged"] == ours.summary["heads_trained"]


@pytest.mark.parametrize("stream", [False, True])
def test_features_from_a_real_store_in_memory_or_streamed(tmp_path, stream):
    from stores import open_store
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    data = synthetic_data(300, dim=8, n_classes=3, skip_every=17, seed=1)
    url = write_synthetic_store(str(tmp_path / "s"), data, synthetic_identity(data), chunk_rows=32)
    store = open_store(url)
    fs = FeatureSet.from_store(store, max_bytes=0 if stream else None)
    assert ("train" in fs.streams) == stream and fs.dim == 8 and fs.num_classes == 3
    assert fs.num_rows("train") == len(store.labels("train"))
    assert fs.get("test").ids == tuple(store.ids("test"))
    r = train_head_bank(fs, [HeadSpec(lr=3e-2, weight_decay=1e-3)], TrainConfig(batch_size=32))
    assert r.val[0]["solver"] == ("minibatch" if stream else "lbfgs")
    assert r.test["top1"] > 0.9 and r.test_ids == tuple(store.ids("test"))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_bank_optimizer_matches_torch_per_head(kind):
    """Per-head lr and λ vectors over stacked parameters = torch's Adam/SGD run on each head
    alone (coupled L2 on the weight only, a changing schedule, a stopped head)."""
    from pipeline.heads.optim import BankOptimizer

    H, C, D = 4, 3, 5
    specs = [
        HeadSpec(lr=lr, weight_decay=wd)
        for lr, wd in ((1e-2, 0.1), (3e-2, 0), (1e-3, 1), (5e-2, 1e-2))
    ]
    bank = HeadBank(H, D, C)
    bank.freeze_layer_norm(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    names = ("weight", "bias", "ln_weight", "ln_bias")
    refs = []
    for h, spec in enumerate(specs):
        params = {n: torch.nn.Parameter(getattr(bank, n)[h].detach().clone()) for n in names}
        groups = [
            {"params": [params["weight"]], "weight_decay": spec.weight_decay},
            {"params": [params[n] for n in names[1:]], "weight_decay": 0.0},
        ]
        if kind == "adam":
            opt = torch.optim.Adam(groups, lr=spec.lr, foreach=False)
        else:
            opt = torch.optim.SGD(groups, lr=spec.lr, momentum=0.9, foreach=False)
        refs.append((params, opt))
    ours = BankOptimizer(bank, specs, optimizer=kind, momentum=0.9)
    for step in range(6):
        grads = {n: torch.randn(getattr(bank, n).shape, generator=g) for n in names}
        scale = 0.9**step * torch.tensor([1.0, 1.0, 0.0 if step >= 3 else 1.0, 1.0])
        ours.set_lr(ours.base_lr * scale)
        for n in names:
            getattr(bank, n).grad = grads[n].clone()
        ours.step()
        for h, (params, opt) in enumerate(refs):
            for group in opt.param_groups:
                group["lr"] = specs[h].lr * float(scale[h])
            for n in names:
                params[n].grad = grads[n][h].clone()
            opt.step()
    for h, (params, _) in enumerate(refs):
        for n in names:
            torch.testing.assert_close(
                getattr(bank, n)[h].detach(), params[n].detach(), rtol=1e-5, atol=1e-6
            )


def test_fit_sample_streamed_takes_the_first_rows_of_each_class():
    X, y = gaussian_data(n=200, d=4, c=3)
    X[:, 0] = np.arange(200)
    fs = FeatureSet.from_arrays({"train": (X[:1], y[:1])}, class_names=["a", "b", "c"])
    del fs.splits["train"]
    fs.streams["train"] = StreamingFeatures.from_arrays(X, y, block_rows=23)
    Xs, ys = fs.fit_sample("train", max_per_class=10)
    assert np.array_equal(np.bincount(ys.numpy()), [10, 10, 10])
    for c in range(3):
        expect = np.flatnonzero(y == c)[:10]
        assert np.array_equal(np.sort(Xs[ys == c][:, 0].numpy().astype(int)), expect)


def test_min_steps_scales_epochs_and_warmup():
    cfg = TrainConfig(epochs=30, warmup_epochs=1.0, aug_warmup_epochs=2, min_steps=300)
    small = scale_for_min_steps(cfg, steps_per_epoch=2)  # 60 steps < 300: 5× the epochs
    assert (small.epochs, small.warmup_epochs, small.aug_warmup_epochs) == (150, 5.0, 10)
    assert scale_for_min_steps(cfg, steps_per_epoch=10) is cfg  # 300 steps already
    assert scale_for_min_steps(TrainConfig(min_steps=0), steps_per_epoch=1).epochs == 100
