"""Head-bank training: parity with independently trained heads, schedule, early stopping,
selection, streaming, outputs."""

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

from pipeline.augment import DCSettings, GaussianSettings, IsdaSettings, MixupSettings
from pipeline.baseline import BaselineConfig, fit_logistic_baseline
from pipeline.carrot import CarrotConfig
from pipeline.errors import InputError
from pipeline.features import FeatureSet, StreamingFeatures
from pipeline.head_io import load_head, write_outputs
from pipeline.heads import INIT_STD, Head, HeadGrid, HeadSpec
from pipeline.predict import predict
from pipeline.train import TrainConfig, fit_bank, lr_at, train_head_bank


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


def reference_head(X, y, spec: HeadSpec, cfg: TrainConfig) -> Head:
    """One head trained alone with plain PyTorch modules (no bank code)."""
    N, D = X.shape
    C = int(y.max()) + 1
    head = Head(D, C)
    with torch.no_grad():
        g = torch.Generator().manual_seed(spec.seed)
        head.fc.weight.copy_(torch.randn(C, D, generator=g) * INIT_STD)
    groups = [
        {"params": [head.fc.weight], "weight_decay": spec.weight_decay},
        {"params": list(head.norm.parameters()), "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=spec.lr)
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


@pytest.mark.parametrize("impl", ["torch", "multi_tensor"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_bank_equals_independently_trained_heads(optimizer, impl):
    X, y = gaussian_data(n=200, d=10, c=4)
    fs = FeatureSet.from_arrays({"train": (X, y)})
    specs = [
        HeadSpec(lr=1e-2, weight_decay=0.0, seed=0),
        HeadSpec(lr=3e-2, weight_decay=0.1, seed=1),
        HeadSpec(lr=1e-3, weight_decay=1.0, label_smoothing=0.1, seed=2),
        HeadSpec(lr=5e-2, weight_decay=0.01, seed=0),
    ]
    cfg = TrainConfig(
        optimizer=optimizer,
        optimizer_impl=impl,
        epochs=3,
        batch_size=32,
        warmup_epochs=1,
        patience=None,
    )
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
    cfg = TrainConfig(epochs=2, batch_size=40, patience=None)
    bank = fit_bank(fs, specs, cfg, val_split=None).bank
    for h, spec in enumerate(specs):
        alone = fit_bank(fs, [spec], cfg, val_split=None).bank
        torch.testing.assert_close(bank.weight[h], alone.weight[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bank.ln_weight[h], alone.ln_weight[0], rtol=1e-4, atol=1e-5)
    # the augmentations did something: the gaussian head differs from the plain one
    assert not torch.allclose(bank.weight[0], bank.weight[1], atol=1e-4)


def test_carrot_heads_log_diagnostics():
    fs = gaussian_set()
    spec = HeadSpec(lr=3e-2, aug="carrot", aug_settings=CarrotConfig(topk=2))
    cfg = TrainConfig(epochs=3, batch_size=32, patience=None, aug_warmup_epochs=1)
    r = train_head_bank(fs, [HeadSpec(lr=3e-2), spec], cfg)
    assert r.diagnostics[0] == {}  # warm-up epoch: no augmentation
    later = r.diagnostics[-1][1]
    assert 0.0 <= later["frac_augmented"] <= 1.0 and later["frac_augmented"] > 0
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


def test_early_stopping_keeps_each_heads_best_state():
    # label noise + a large lr: validation accuracy peaks early, then the heads overfit
    X, y = gaussian_data(n=120, d=40, c=4, spread=0.4)
    y = y.copy()
    y[::3] = (y[::3] + 1) % 4
    Xv, yv = gaussian_data(n=200, d=40, c=4, spread=0.4, seed=0)
    Xv = Xv + np.random.default_rng(5).standard_normal(Xv.shape).astype(np.float32)
    fs = FeatureSet.from_arrays({"train": (X, y), "val": (Xv, yv)})
    specs = [HeadSpec(lr=0.1), HeadSpec(lr=0.03, seed=1)]
    cfg = TrainConfig(epochs=60, batch_size=16, patience=4, warmup_epochs=0)
    r = train_head_bank(fs, specs, cfg)
    curve = np.asarray(r.curves["val_balanced_accuracy"])  # (epochs, heads)
    assert r.epochs_run < 60  # everyone stopped
    for h in range(2):
        best_epoch = r.val[h]["best_epoch"]
        assert r.val[h]["stopped"]
        assert r.val[h]["balanced_accuracy"] == pytest.approx(curve[best_epoch, h], abs=1e-6)
        assert r.val[h]["balanced_accuracy"] == pytest.approx(curve[: best_epoch + 5, h].max())
    # the final (restored) state is not the last epoch's state
    assert any(curve[-1, h] < r.val[h]["balanced_accuracy"] for h in range(2))


def test_selection_never_looks_at_test():
    fs = gaussian_set()
    grid = HeadGrid.from_lists(lrs=[1e-3, 1e-2, 1e-1], weight_decays=[0.0, 1.0])
    cfg = TrainConfig(epochs=4, batch_size=32)
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
    r = train_head_bank(
        FeatureSet.from_arrays({"train": (X, y)}), [HeadSpec()], TrainConfig(epochs=1)
    )
    assert r.test is None and 0.0 <= r.val[0]["balanced_accuracy"] <= 1.0


def _chunked(X, y, rows):
    def make():
        for s in range(0, len(y), rows):
            yield X[s : s + rows], y[s : s + rows]

    return make


def test_streaming_single_chunk_equals_in_memory():
    X, y = gaussian_data(n=150, d=8, c=3)
    mem = FeatureSet.from_arrays({"train": (X, y)})
    stream = FeatureSet.from_arrays({"train": (X[:1], y[:1])}, class_names=["a", "b", "c"])
    del stream.splits["train"]
    stream.streams["train"] = StreamingFeatures(_chunked(X, y, 10_000), num_rows=150, dim=8)
    cfg = TrainConfig(epochs=2, batch_size=32, patience=None)
    a = fit_bank(mem, [HeadSpec(lr=1e-2)], cfg, val_split=None).bank
    b = fit_bank(stream, [HeadSpec(lr=1e-2)], cfg, val_split=None).bank
    torch.testing.assert_close(a.weight, b.weight)


def test_streaming_chunks_cover_every_row_once_per_epoch():
    X, y = gaussian_data(n=103, d=4, c=3)
    X[:, 0] = np.arange(103)  # row id in column 0
    s = StreamingFeatures(_chunked(X, y, 17), num_rows=103, dim=4, prefetch=2)
    seen = []
    for xb, _yb in s.batches(
        10, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    ):
        assert len(xb) <= 10
        seen.extend(xb[:, 0].long().tolist())
    assert sorted(seen) == list(range(103))


def test_streaming_reader_errors_reach_the_trainer():
    def broken():
        yield np.zeros((5, 4), np.float32), np.zeros(5, np.int64)
        raise OSError("disk gone")

    s = StreamingFeatures(broken, num_rows=10, dim=4)
    with pytest.raises(OSError, match="disk gone"):
        list(s.batches(2, generator=None, device=torch.device("cpu")))


def test_outputs_written_and_head_reloads_identically(tmp_path):
    fs = gaussian_set()
    r = train_head_bank(fs, [HeadSpec(lr=1e-2), HeadSpec(lr=3e-2)], TrainConfig(epochs=3))
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
    r = train_head_bank(fs, [HeadSpec(lr=3e-2)], TrainConfig(epochs=5, dtype="bfloat16"))
    assert r.test["top1"] > 0.8


def test_device_mismatch_and_bad_config_are_input_errors():
    fs = gaussian_set()
    with pytest.raises(InputError):
        TrainConfig(optimizer="adam")
    with pytest.raises(InputError):
        train_head_bank(fs, [HeadSpec()], TrainConfig(device="meta"))


def test_bank_matches_logistic_regression_on_digits():
    """Benchmark target: the default grid's best head within 0.5 point of best-C sklearn."""
    fs = digits_set()
    bank = train_head_bank(fs, HeadGrid.default(), TrainConfig(epochs=30, batch_size=64))
    lr = fit_logistic_baseline(fs, BaselineConfig(Cs=tuple(np.logspace(-2, 2, 9))))
    assert bank.test["top1"] >= lr.test["top1"] - 0.005, (bank.test, lr.test)


@pytest.mark.parametrize("stream", [False, True])
def test_features_from_a_real_store_in_memory_or_streamed(tmp_path, stream):
    from stores import open_store
    from stores.testing import synthetic_data, synthetic_identity, write_synthetic_store

    data = synthetic_data(300, dim=8, n_classes=3, skip_every=17, seed=1)
    url = write_synthetic_store(str(tmp_path / "s"), data, synthetic_identity(data), chunk_rows=32)
    store = open_store(url)
    fs = FeatureSet.from_store(store, max_bytes=0 if stream else None, chunk_rows=64)
    assert ("train" in fs.streams) == stream and fs.dim == 8 and fs.num_classes == 3
    assert fs.num_rows("train") == len(store.labels("train"))
    assert fs.get("test").ids == tuple(store.ids("test"))
    r = train_head_bank(fs, [HeadSpec(lr=3e-2)], TrainConfig(epochs=8, batch_size=32))
    assert r.test["top1"] > 0.9 and r.test_ids == tuple(store.ids("test"))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_multi_tensor_optimizers_match_torch(kind):
    from pipeline.train import MultiHeadAdamW, MultiHeadSGD

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3,), (5, 2), (2,)]
    settings_ = [(1e-2, 0.1), (3e-2, 0.0), (1e-3, 1.0), (5e-2, 0.01)]
    init = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]

    def groups(params):
        return [
            {"params": [p], "lr": lr, "weight_decay": wd}
            for p, (lr, wd) in zip(params, settings_, strict=True)
        ]

    ours_p = [torch.nn.Parameter(t.clone()) for t in init]
    ref_p = [torch.nn.Parameter(t.clone()) for t in init]
    if kind == "adamw":
        ours = MultiHeadAdamW(groups(ours_p))
        ref = torch.optim.AdamW(groups(ref_p), foreach=False)
    else:
        ours = MultiHeadSGD(groups(ours_p), momentum=0.9)
        ref = torch.optim.SGD(groups(ref_p), momentum=0.9, foreach=False)
    for step, gl in enumerate(grads):
        for group in (*ours.param_groups, *ref.param_groups):  # a schedule changes lrs
            group["lr"] *= 0.9
        for p, q, gr in zip(ours_p, ref_p, gl, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step == 2:  # a param without gradient is skipped, as torch does
            ours_p[1].grad = ref_p[1].grad = None
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fit_sample_streamed_takes_the_first_rows_of_each_class():
    X, y = gaussian_data(n=200, d=4, c=3)
    X[:, 0] = np.arange(200)
    fs = FeatureSet.from_arrays({"train": (X[:1], y[:1])}, class_names=["a", "b", "c"])
    del fs.splits["train"]
    fs.streams["train"] = StreamingFeatures(_chunked(X, y, 23), num_rows=200, dim=4)
    Xs, ys = fs.fit_sample("train", max_per_class=10)
    assert np.array_equal(np.bincount(ys.numpy()), [10, 10, 10])
    for c in range(3):
        expect = np.flatnonzero(y == c)[:10]
        assert np.array_equal(np.sort(Xs[ys == c][:, 0].numpy().astype(int)), expect)


def test_min_steps_scales_epochs_patience_and_warmup():
    from pipeline.train import TrainConfig, scale_for_min_steps

    cfg = TrainConfig(epochs=30, patience=10, warmup_epochs=1.0, aug_warmup_epochs=2, min_steps=300)
    small = scale_for_min_steps(cfg, steps_per_epoch=2)  # 60 steps < 300: 5× the epochs
    assert (small.epochs, small.patience, small.warmup_epochs, small.aug_warmup_epochs) == (
        150,
        50,
        5.0,
        10,
    )
    assert scale_for_min_steps(cfg, steps_per_epoch=10) is cfg  # 300 steps already
    assert scale_for_min_steps(TrainConfig(min_steps=0), steps_per_epoch=1).epochs == 30
