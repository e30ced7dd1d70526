"""End-to-end fine-tuning (`pipeline.finetune`) with test_vit on scikit-learn's digits at 32 px:
a short run lowers the training loss, a run stopped after an epoch resumes to the same weights
and optimizer state as one that was not, CARROT's diagnostics are recorded, the export loads as
a ``carrot embed --checkpoint`` backbone, and inputs that cannot work are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.embed.backbone import BackboneConfig, create_backbone
from pipeline.errors import InputError
from pipeline.finetune.checkpoint import load_checkpoint, optimizer_state_equal
from pipeline.finetune.loop import Finetuner, finetune
from pipeline.finetune.settings import FinetuneSettings


def _settings(**changes) -> FinetuneSettings:
    base = FinetuneSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name="test_vit", image_size=32, device="cpu"),
        epochs=2,
        batch_size=64,
        lr=1e-5,
        workers=0,
        train_aug=False,
        aug="none",
    )
    return dataclasses.replace(base, **changes)


class Stop(Exception):
    """Stands for a crash after an epoch's checkpoint was written."""


def test_a_short_run_lowers_the_training_loss(tmp_path):
    """From an untrained head (the probe's warm start leaves little to gain on digits)."""
    from pipeline.heads.bank import Head
    from pipeline.heads.io import save_head

    torch.manual_seed(0)
    save_head(Head(64, 10), tmp_path / "head", class_names=[str(c) for c in range(10)])
    tuner = Finetuner(
        _settings(epochs=3, lr=1e-4, init_head=str(tmp_path / "head")), tmp_path / "run"
    )
    before = tuner.evaluate("train", tuner.model)["loss"]
    start = {k: v.clone() for k, v in tuner.model.backbone.state_dict().items()}
    while not tuner.done:
        tuner.run_epoch()
    after = tuner.evaluate("train", tuner.model)["loss"]
    assert after < 0.5 * before
    losses = [h["train_loss"] for h in tuner.history]
    assert losses[-1] < losses[0]
    moved = [
        k for k, v in tuner.model.backbone.state_dict().items() if not torch.equal(v, start[k])
    ]
    assert any(k.startswith("blocks.0.") for k in moved)  # the whole backbone trains
    summary = tuner.finish()
    assert summary["complete"] and summary["steps"] == 3 * 20  # ceil(1257 / 64) steps per epoch
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["test_top1"] == summary["test_top1"] > 0.3  # chance: 0.1


def test_resume_after_a_crash_continues_at_the_same_step_with_identical_state(tmp_path):
    """Accumulation, EMA, CARROT and timm's seeded training transform all in: the resumed run
    ends bit for bit where the uninterrupted one does."""
    settings = _settings(aug="carrot", train_aug=True, ema=0.99, accum_steps=2, lr=1e-4)
    straight = finetune(settings, tmp_path / "straight")

    def crash(metrics):
        raise Stop(metrics["epoch"])

    with pytest.raises(Stop):
        finetune(settings, tmp_path / "crashed", on_epoch=crash)
    after_one = load_checkpoint(tmp_path / "crashed")
    assert after_one["epoch"] == 1 and after_one["step"] == 10  # 20 micro-batches, 2 per step
    assert (tmp_path / "crashed" / "best" / "model.safetensors").is_file()
    assert not (tmp_path / "crashed" / "summary.json").exists()  # not marked complete

    tuner = Finetuner(settings, tmp_path / "crashed", resume=True)
    assert (tuner.epoch, tuner.step) == (1, 10)
    assert optimizer_state_equal(tuner.optimizer.state_dict(), after_one["optimizer"])
    while not tuner.done:
        tuner.run_epoch()
    resumed = tuner.finish()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "crashed")
    assert a["step"] == b["step"] == 20
    assert optimizer_state_equal(a["optimizer"], b["optimizer"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in straight["history"]
    ]


def test_carrot_diagnostics_are_recorded_per_epoch(tmp_path):
    summary = finetune(_settings(aug="carrot", epochs=1, lr=1e-4), tmp_path / "run")
    epoch = summary["history"][0]
    assert epoch["aug_rows"] > 0 and 0.0 <= epoch["violation_rate"] <= 1.0
    assert {"frac_augmented", "median_alpha"} <= set(epoch["diagnostics"])
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[0]["aug_rows"] == epoch["aug_rows"]
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0


def test_the_export_loads_as_an_embed_checkpoint(tmp_path):
    """``best/model.safetensors`` is a timm state dict: `create_backbone(checkpoint=...)` (what
    carrot embed --checkpoint runs) gives the fine-tuned model's embeddings."""
    from pipeline.heads.io import load_head

    tuner = Finetuner(_settings(epochs=1, lr=1e-4), tmp_path / "run")
    tuner.run_epoch()
    summary = tuner.finish()
    path = summary["files"]["backbone"]
    state = load_file(path)
    assert not any(k.startswith("head.") for k in state)
    loaded = create_backbone(
        BackboneConfig(name="test_vit", image_size=32, device="cpu", checkpoint=path)
    )
    x = torch.randn(4, 3, 32, 32)
    tuner.model.eval()
    with torch.no_grad():
        want = tuner.model.backbone(x)
    assert torch.allclose(loaded.forward(x), want, atol=1e-5)
    head, config = load_head(summary["files"]["head"])
    assert config["class_names"] == [str(c) for c in range(10)]
    assert torch.allclose(head(want), tuner.model.head(want), atol=1e-6)


def test_a_stage2_head_is_the_warm_start(tmp_path):
    """``init_head``: the run starts from the saved head (its val accuracy on the live backbone's
    embeddings is that head's); one of other classes or width is refused by name."""
    from pipeline.heads.bank import Head
    from pipeline.heads.io import save_head

    tuner = Finetuner(_settings(epochs=1), tmp_path / "probe")  # a probe head for this backbone
    head = tuner.model.head
    save_head(head, tmp_path / "head", class_names=[str(c) for c in range(10)])
    warm = Finetuner(_settings(epochs=1, init_head=str(tmp_path / "head")), tmp_path / "warm")
    assert warm.warm_start["kind"] == "head" and warm.warm_start["from"] == str(tmp_path / "head")
    assert warm.warm_start["val_top1"] == tuner.warm_start["val_top1"] > 0.5  # the same model
    save_head(Head(64, 3), tmp_path / "three", class_names=["a", "b", "c"])
    with pytest.raises(InputError, match="classes"):
        Finetuner(_settings(init_head=str(tmp_path / "three")), tmp_path / "x")
    save_head(Head(32, 10), tmp_path / "narrow", class_names=[str(c) for c in range(10)])
    with pytest.raises(InputError, match="D=32"):
        Finetuner(_settings(init_head=str(tmp_path / "narrow")), tmp_path / "y")


def test_an_existing_run_is_never_overwritten_or_resumed_by_accident(tmp_path):
    out = tmp_path / "run"
    finetune(_settings(epochs=1), out)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(InputError, match="pass --resume"):
        Finetuner(_settings(epochs=1), out)
    with pytest.raises(InputError, match=r"other settings \(epochs, lr\)"):
        Finetuner(_settings(epochs=2, lr=1e-3), out, resume=True)
    with pytest.raises(InputError, match=r"no checkpoint\.pt"):
        Finetuner(_settings(), tmp_path / "empty", resume=True)
    assert (out / "checkpoint.pt").read_bytes() == before
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "checkpoint.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(InputError, match="not a readable checkpoint"):
        Finetuner(_settings(), tmp_path / "cut", resume=True)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"epochs": 0}, "--epochs 0"),
        ({"lr": -1.0}, "--lr -1.0"),
        ({"layer_decay": 1.5}, "--layer-decay 1.5"),
        ({"ema": 1.0}, "--ema 1.0"),
        ({"warmup_epochs": 5.0}, "--warmup-epochs 5.0"),
        ({"aug": "dc"}, "--aug dc"),
        ({"aug": "nope"}, "unknown augmentation"),
        ({"backbone": BackboneConfig(name="test_vit", cache_at=1)}, "--cache-at"),
    ],
)
def test_settings_that_cannot_work_are_refused(changes, needle):
    with pytest.raises(InputError, match=needle.replace(".", r"\.")):
        _settings(**changes)


def test_unreadable_images_are_skipped_and_counted(shapes_folder, tmp_path):
    settings = _settings(data=str(shapes_folder), epochs=1, batch_size=4, val_fraction=0.2)
    tuner = Finetuner(settings, tmp_path / "run")
    metrics = tuner.run_epoch()
    assert metrics["images"] + metrics["skipped_images"] == len(tuner.train_set)
    total_bad = sum(not _readable(tuner.source, int(r)) for r in tuner.source.indices("train"))
    assert total_bad == 1 and metrics["skipped_images"] == total_bad  # square/corrupt.jpg


def _readable(source, row: int) -> bool:
    from pipeline.embed.images import ImageLoadError

    try:
        source.load(row)
    except ImageLoadError:
        return False
    return True
