"""``carrot train STORE --trainable-blocks N`` over an activation cache: training lowers the
training loss and moves only the top (last N blocks, final norm, head) — ViT tokens and ResNet /
ConvNeXt feature maps — CARROT's extra rows carry gradient into the blocks, the run folder is
self-contained (a checkpoint-written cache included) and `carrot predict` runs it, and stores or
N that cannot are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.embed.backbone import BackboneConfig, create_backbone
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding
from pipeline.errors import InputError
from pipeline.heads.top import PartialTop, TopSettings, train_top, trainable_parameters
from stores import open_store


def _store(root, name: str = "test_vit", **backbone) -> str:
    settings = EmbedSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name=name, image_size=32, **backbone),
        extract=ExtractConfig(batch_size=128, num_workers=0),
        root=str(root),
    )
    return run_embedding(settings).store


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float16 token cache of digits at block:-2 (the input of test_vit's last 2 blocks)."""
    return open_store(_store(tmp_path_factory.mktemp("tokens"), cache_at=2))


def test_training_lowers_the_loss_and_moves_only_the_top(cache):
    result = train_top(cache, TopSettings(blocks=1, epochs=3, lr=1e-3))
    assert result.train_loss[-1] < 0.6 * result.train_loss[0]
    assert result.test_top1 is not None and result.test_top1 > 0.5
    depth = 6  # test_vit
    block = f"model.blocks.{depth - 1}."
    assert set(result.changed) == set(result.trainable)
    assert all(
        n.startswith((block, "model.norm.", "model.fc_norm.", "ln.", "fc."))
        for n in result.trainable
    )
    assert any(n.startswith(block) for n in result.changed)
    assert not any(n.startswith(f"model.blocks.{depth - 2}.") for n in result.trainable)


def test_frozen_parameters_equal_the_stores_backbone(cache):
    """Nothing outside the top moves: the model after training equals a fresh build there."""
    from pipeline.heads import top as top_module

    cfg = top_module.backbone_config_of(cache)
    torch.manual_seed(0)
    model = create_backbone(cfg).model
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    part = PartialTop(model, cached=2, trainable=1, num_classes=10)
    names = trainable_parameters(part)
    optim = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 5, 64)
    loss = F.cross_entropy(part.fc(part.head_input(x)), torch.arange(8) % 10)
    loss.backward()
    optim.step()
    moved = {f"model.{k}" for k, v in model.state_dict().items() if not torch.equal(v, fresh[k])}
    assert moved and moved <= set(names)


def test_carrots_extra_rows_carry_gradient_into_the_blocks(cache):
    from pipeline.augment.registry import create_augmentation

    cfg = BackboneConfig(name="test_vit", image_size=32, cache_at=2)
    part = PartialTop(create_backbone(cfg).model, cached=2, trainable=1, num_classes=10)
    trainable_parameters(part)
    x = torch.from_numpy(cache.features("train")[:64]).view(-1, 5, 64)
    y = torch.from_numpy(cache.labels("train")[:64].astype("int64"))
    z = part.head_input(x)
    logits = part.fc(z)
    aug = create_augmentation("carrot", num_classes=10)
    extra = aug(z, y, logits.detach(), part.fc.weight.detach(), generator=torch.Generator())
    assert len(extra) > 0
    F.cross_entropy(part.fc(extra.z), extra.y).backward()  # the augmented term alone
    grad = part.trainable[0].mlp.fc1.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_stores_and_blocks_that_cannot_are_refused(cache, tmp_path):
    with pytest.raises(InputError, match="at most 2"):
        train_top(cache, TopSettings(blocks=3, epochs=1))
    pooled = open_store(_store(tmp_path))
    with pytest.raises(InputError, match="--cache-at block:-N"):
        train_top(pooled, TopSettings(blocks=1, epochs=1))
    with pytest.raises(InputError, match="--trainable-blocks"):
        TopSettings(blocks=0)


def test_cli_embed_cache_then_train_top(tmp_path, prefect_harness, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.setenv("CARROT_HOME", str(tmp_path))
    embed = ["embed", "sklearn:digits", "--backbone", "test_vit", "--image-size", "32"]
    assert main([*embed, "--cache-at", "block:-1", "--json"]) == 0
    out = capsys.readouterr()
    assert "1797 rows × 5 tokens × 64 × 2 bytes = 1.1 MiB" in out.err
    store = json.loads(out.out)["store"]
    train = ["train", store, "--trainable-blocks", "1", "--epochs", "2", "--aug", "carrot"]
    env = os.environ | {"CARROT_HOME": str(tmp_path), "CARROT_RUNNER": "0"}
    done = subprocess.run(  # the command as users run it: a new process, its own flow run
        [sys.executable, "-m", "flows.cli", *train, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert len(summary["train_loss"]) == 2 and summary["augmented_rows"] > 0
    assert summary["files"]["weights"].startswith(str(tmp_path / "runs"))
    assert main(["train", store, "--trainable-blocks", "2"]) == 2
    err = capsys.readouterr().err
    assert "give at most 1" in err and len(err.strip().splitlines()) == 1
    run = summary["files"]["config"].rsplit("/", 1)[0]
    assert main(["predict", store, "--head", run, "--split", "test", "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["top1"] - summary["test_top1"]) < 1e-9
    assert main(["train", store, "--checkpoint", "x.pt"]) == 2
    assert "only a --trainable-blocks run" in capsys.readouterr().err


def test_the_run_folder_loads_back_to_the_same_top(cache, tmp_path):
    from pipeline.heads.top_io import load_top, write_top_run

    settings = TopSettings(blocks=1, epochs=1)
    result = train_top(cache, settings)
    files = write_top_run(str(tmp_path / "run"), result, cache, settings)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["top.json", "top.safetensors"]
    top = load_top(str(tmp_path / "run"))
    x = torch.from_numpy(cache.features("test")).view(-1, 5, 64)
    with torch.no_grad():
        pred = top.fc(top.head_input(x)).argmax(-1)
    y = torch.from_numpy(cache.labels("test").astype("int64"))
    assert abs(float((pred == y).double().mean()) - result.test_top1) < 1e-12
    (tmp_path / "run" / "top.safetensors").write_bytes(b"not weights")
    with pytest.raises(InputError, match="not a partially frozen run"):
        load_top(str(tmp_path / "run"))
    assert files["config"].endswith("top.json")


def test_the_run_folder_is_self_contained_and_predict_runs_it(cache, tmp_path, prefect_harness):
    """The top is rebuilt from top.json (not the training store); `carrot predict` over the
    store scores what training measured; a store cached elsewhere is refused with the fix."""
    from flows.train import predict_flow
    from pipeline.heads.top_io import read_top_config, write_top_run

    settings = TopSettings(blocks=1, epochs=1)
    result = train_top(cache, settings)
    run = str(tmp_path / "run")
    write_top_run(run, result, cache, settings)
    config = read_top_config(run)
    assert config["backbone"] == {
        "name": "test_vit",
        "pretrained": False,
        "checkpoint": None,
        "seed": 0,
        "image_size": 32,
    }
    assert config["cache"]["cache_at"] == "block:-2" and config["cache"]["row_shape"] == [5, 64]
    out = predict_flow(cache.url, run, str(tmp_path / "p.csv"), "test")
    assert out["labelled"] and abs(out["top1"] - result.test_top1) < 1e-12
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + len(cache.labels("test"))
    other = open_store(_store(tmp_path, cache_at=1))  # same backbone, another cache point
    with pytest.raises(InputError, match=r"runs over block:-2 .* --cache-at block:-2"):
        predict_flow(other.url, run, str(tmp_path / "q.csv"))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_convnet_feature_map_caches_train_their_last_stage(name, tmp_path):
    """A ConvNet cache holds (C, H, W) feature maps; training moves the last stage and the norms
    after it only, and the frozen stages' BatchNorm statistics stay as they were."""
    store = open_store(_store(tmp_path, name=name, cache_at=2))
    cached, shape = __import__("pipeline.heads.top", fromlist=["x"]).cache_point(store)
    assert cached == 2 and len(shape) == 3 and store.identity.extra["feature_map"] == list(shape)
    result = train_top(store, TopSettings(blocks=1, epochs=3, lr=3e-3, aug="carrot"))
    assert result.train_loss[-1] < 0.8 * result.train_loss[0]
    assert result.diagnostics["augmented_rows"] > 0
    last = "model.layer4." if name == "test_resnet" else "model.stages.3."
    allowed = (last, "ln.", "fc.") + (("model.head.norm.",) if name == "test_convnext" else ())
    assert all(n.startswith(allowed) for n in result.trainable)
    assert set(result.changed) == set(result.trainable)
    if name == "test_resnet":  # frozen BatchNorm: its running statistics did not move
        from pipeline.heads import top as top_module

        torch.manual_seed(0)
        model = create_backbone(top_module.backbone_config_of(store)).model
        fresh = {k: v.clone() for k, v in model.layer3.state_dict().items()}
        part = PartialTop(model, cached=2, trainable=1, num_classes=10)
        trainable_parameters(part)
        part.train()
        part.head_input(torch.randn(16, *shape))
        assert all(torch.equal(v, fresh[k]) for k, v in model.layer3.state_dict().items())
        assert not part.frozen[0].training and part.trainable[0].training


def test_checkpoint_written_caches_train_with_their_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    from pipeline.heads.top_io import load_top, write_top_run

    torch.manual_seed(3)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    store = open_store(_store(tmp_path, checkpoint=str(path), cache_at=1))
    with pytest.raises(InputError, match="written from a checkpoint; pass --checkpoint PATH"):
        train_top(store, TopSettings(blocks=1, epochs=1))
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(InputError, match=r"--checkpoint .*other.safetensors: sha256 .* is not"):
        train_top(store, TopSettings(blocks=1, epochs=1, checkpoint=str(other)))
    settings = TopSettings(blocks=1, epochs=1, checkpoint=str(path))
    result = train_top(store, settings)
    run = str(tmp_path / "run")
    write_top_run(run, result, store, settings)
    top = load_top(run)
    x = torch.from_numpy(store.features("test")).view(-1, 5, 64)
    with torch.no_grad():
        pred = top.fc(top.head_input(x)).argmax(-1)
    y = torch.from_numpy(store.labels("test").astype("int64"))
    assert abs(float((pred == y).double().mean()) - result.test_top1) < 1e-12
    path.rename(tmp_path / "moved.safetensors")
    with pytest.raises(InputError, match="is gone or has changed; put that file back"):
        load_top(run)
