"""create_backbone on real tiny timm models: width, freezing, weights, offline hub, transforms."""

from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pytest
import timm
import torch
from image_factory import draw_shape
from safetensors.torch import save_file

from pipeline.embed.backbone import (
    BackboneConfig,
    check_weights,
    create_backbone,
    describe_backbone,
    resolve_device,
    resolve_precision,
    validate_backbone_name,
)
from pipeline.embed.weights import load_checkpoint_file
from pipeline.errors import InputError

CPU = {"device": "cpu"}


def _x(backbone, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *backbone.input_size), generator=g)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_create_backbone_basics(name):
    b = create_backbone(BackboneConfig(name, **CPU))
    y = b.forward(_x(b, 3))
    assert y.shape == (3, b.dim) and y.dtype == torch.float32
    assert b.dim == timm.create_model(name, num_classes=0)(_x(b, 1)).shape[-1]
    assert not b.model.training
    assert not any(p.requires_grad for p in b.model.parameters())
    assert b.device == torch.device("cpu") and b.precision == "fp32"
    assert json.loads(json.dumps(b.data_config)) == b.data_config  # JSON-serializable
    assert b.data_config["input_size"] == [3, 160, 160]
    assert b.weights == {"kind": "random", "seed": 0}


def test_dim_is_the_forward_width_not_num_features():
    b = create_backbone(BackboneConfig("test_mambaout", **CPU))
    assert b.model.num_features == 64  # timm's num_features is the pre-head width here
    assert b.dim == 256 == b.forward(_x(b, 1)).shape[-1]


def test_building_a_backbone_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    create_backbone(BackboneConfig("test_resnet", seed=7, **CPU))
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_weights():
    a = create_backbone(BackboneConfig("test_resnet", seed=3, **CPU))
    b = create_backbone(BackboneConfig("test_resnet", seed=3, **CPU))
    c = create_backbone(BackboneConfig("test_resnet", seed=4, **CPU))
    for (k, va), vb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
    x = _x(a)
    assert torch.equal(a.forward(x), b.forward(x))
    assert not torch.allclose(a.forward(x), c.forward(x))
    assert c.weights == {"kind": "random", "seed": 4}


def _trained_like(name="test_resnet", seed=11):
    """A model with a classifier (num_classes=7), as a user's fine-tuned checkpoint would be."""
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=7).eval()


def _reference(model, backbone):
    model.reset_classifier(0)
    with torch.inference_mode():
        return model(_x(backbone))


@pytest.mark.parametrize(
    "layout", ["safetensors", "plain", "state_dict", "model", "module", "compiled", "ema"]
)
def test_checkpoint_loading(tmp_path, layout):
    src = _trained_like()
    sd = src.state_dict()
    assert "fc.weight" in sd  # classifier keys must be dropped by the loader
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        path = tmp_path / "w.pth"
        obj = {
            "plain": sd,
            "state_dict": {"state_dict": sd, "epoch": 3},
            "model": {"model": sd, "optimizer": {}},
            "module": {f"module.{k}": v for k, v in sd.items()},
            "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile'd model
            # timm's loader takes the EMA weights of a training checkpoint: so does the check
            "ema": {"state_dict": _trained_like(seed=12).state_dict(), "state_dict_ema": sd},
        }[layout]
        torch.save(obj, path)
    b = create_backbone(BackboneConfig("test_resnet", checkpoint=str(path), **CPU))
    assert b.weights["kind"] == "checkpoint" and b.weights["file"] == path.name
    assert b.weights["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(b.forward(_x(b)), _reference(src, b))


def test_vit_checkpoint_at_another_image_size(tmp_path):
    """timm's own checkpoint filter resamples ViT position embeddings to the new size."""
    src = _trained_like("test_vit")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    b = create_backbone(BackboneConfig("test_vit", checkpoint=str(path), image_size=96, **CPU))
    assert b.input_size == (3, 96, 96)
    assert b.forward(_x(b)).shape == (2, b.dim)


def test_deit3_checkpoint_in_its_original_layout_goes_through_timms_own_filter(tmp_path):
    """DeiT-III as its authors saved it (``blocks.N.gamma_1``), with a 5-class head, at 224 px:
    timm registers DeiT's filter with ``adapt_layer_scale=True`` (``gamma_1`` → ``ls1.gamma``),
    drops the head and resamples the position embeddings to 64 px."""
    torch.manual_seed(3)
    src = timm.create_model("deit3_small_patch16_224", num_classes=5).eval()
    sd = src.state_dict()
    original = {
        re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v.contiguous() for k, v in sd.items()
    }
    assert "blocks.0.gamma_1" in original and "head.weight" in original
    path = tmp_path / "deit3_original.safetensors"
    save_file(original, path)
    cfg = BackboneConfig("deit3_small_patch16_224", checkpoint=str(path), image_size=64, **CPU)
    check_weights(cfg)
    b = create_backbone(cfg)
    for i in (0, 11):
        assert torch.equal(b.model.blocks[i].ls1.gamma, sd[f"blocks.{i}.ls1.gamma"])
        assert torch.equal(b.model.blocks[i].ls2.gamma, sd[f"blocks.{i}.ls2.gamma"])
    assert torch.equal(b.model.blocks[5].attn.qkv.weight, sd["blocks.5.attn.qkv.weight"])
    assert b.model.pos_embed.shape == (1, 16, 384)  # 4 x 4 patches, resampled from 14 x 14
    assert torch.isfinite(b.forward(_x(b))).all()


def test_head_keys_are_dropped_when_the_pretrained_config_has_no_classifier(tmp_path):
    """DINO's config says num_classes=0, so timm alone would refuse the head of a fine-tune."""
    name = "vit_small_patch16_224.dino"
    assert timm.models.get_pretrained_cfg(name).num_classes == 0
    torch.manual_seed(4)
    src = timm.create_model(name, num_classes=7, img_size=64).eval()
    path = tmp_path / "dino_finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    cfg = BackboneConfig(name, checkpoint=str(path), image_size=64, **CPU)
    check_weights(cfg)
    b = create_backbone(cfg)
    torch.testing.assert_close(b.forward(_x(b)), _reference(src, b))


def _one_clean_line(message: str) -> None:
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only" not in message  # never advise loading pickled code


def test_pickled_object_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _trained_like().state_dict(), "extra": Exploit()}, path)
    for check in (
        lambda: create_backbone(BackboneConfig("test_resnet", checkpoint=str(path), **CPU)),
        lambda: check_weights(BackboneConfig("test_resnet", checkpoint=str(path), **CPU)),
    ):
        with pytest.raises(InputError, match=r"evil.pth' is refused: it carries pickled code") as e:
            check()
        _one_clean_line(str(e.value))
        assert "pickled code (getattr)" in str(e.value)  # the global the pickle calls
        assert "save_file(model.state_dict()" in str(e.value)
    assert not Exploit.ran


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"hello\n", "looks like text"),
        (b"path,label\nimg/a.png,cat\n", "looks like text"),
        (b"", "is empty"),
        (bytes(range(256)) * 4, "no zip or pickle header"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, suffix, payload, needle):
    path = tmp_path / f"notes{suffix}"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=rf"notes\{suffix}' is not a PyTorch checkpoint") as e:
        load_checkpoint_file(str(path))
    assert needle in str(e.value) and "torch.save(model.state_dict()" in str(e.value)
    _one_clean_line(str(e.value))


def test_truncated_and_misnamed_checkpoints(tmp_path):
    good = tmp_path / "w.pth"
    torch.save(_trained_like().state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cannot read checkpoint .*cut.pth.*truncated") as e:
        load_checkpoint_file(str(cut))
    _one_clean_line(str(e.value))
    st = tmp_path / "really_safetensors.pth"
    save_file({"a": torch.zeros(2)}, st)
    with pytest.raises(InputError, match=r"is a \.safetensors file.*rename it"):
        load_checkpoint_file(str(st))
    (tmp_path / "text.safetensors").write_text("hello this is text\n")
    with pytest.raises(InputError, match=r"cannot read checkpoint .*text.safetensors.*not a"):
        load_checkpoint_file(str(tmp_path / "text.safetensors"))


def test_non_finite_weights_name_the_checkpoint_and_tensor(tmp_path):
    sd = _trained_like().state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.weight"][0, 0] = float("inf")  # classifier keys are dropped: not reported
    path = tmp_path / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    cfg = BackboneConfig("test_resnet", checkpoint=str(path), **CPU)
    for check in (lambda: check_weights(cfg), lambda: create_backbone(cfg)):
        with pytest.raises(
            InputError, match=r"nan.safetensors' holds NaN/Inf in tensor 'layer1.0.conv1.weight'"
        ) as e:
            check()
        assert "--precision" not in str(e.value)
    ok = dict(sd)
    ok["layer1.0.conv1.weight"] = torch.zeros_like(sd["layer1.0.conv1.weight"])
    save_file({k: v.contiguous() for k, v in ok.items()}, tmp_path / "ok.safetensors")
    check_weights(BackboneConfig("test_resnet", checkpoint=str(tmp_path / "ok.safetensors")))


def test_check_weights_catches_a_misfit_before_building_the_model(tmp_path, monkeypatch):
    vit = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in _trained_like("test_vit").state_dict().items()}, vit)
    import pipeline.embed.backbone as bb

    real_build = bb._build_model

    def meta_only(cfg, **kwargs):
        model = real_build(cfg, **kwargs)
        assert next(model.parameters()).device.type == "meta", "check_weights built a real model"
        return model

    monkeypatch.setattr(bb, "_build_model", meta_only)
    with pytest.raises(InputError, match=r"does not fit ResNet.*missing key"):
        check_weights(BackboneConfig("test_resnet", checkpoint=str(vit), **CPU))
    check_weights(BackboneConfig("test_vit", checkpoint=str(vit), image_size=96, **CPU))
    check_weights(BackboneConfig("test_vit", checkpoint=str(vit), **CPU))
    check_weights(BackboneConfig("test_resnet", **CPU))  # random init: nothing to check


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True
        return "pwned"


def test_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        create_backbone(BackboneConfig("test_resnet", checkpoint=str(tmp_path / "no.pth"), **CPU))
    wrong = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in _trained_like("test_vit").state_dict().items()}, wrong)
    with pytest.raises(InputError, match=r"does not fit ResNet.*missing key"):
        create_backbone(BackboneConfig("test_resnet", checkpoint=str(wrong), **CPU))
    partial = tmp_path / "partial.pth"
    sd = _trained_like().state_dict()
    sd.pop("conv1.0.weight")
    torch.save(sd, partial)
    with pytest.raises(InputError, match=r"missing key.*conv1\.0\.weight"):
        create_backbone(BackboneConfig("test_resnet", checkpoint=str(partial), **CPU))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint_file(str(tmp_path / "junk.safetensors"))
    (tmp_path / "w.ckpt").write_bytes(b"")
    with pytest.raises(InputError, match="unknown type"):
        load_checkpoint_file(str(tmp_path / "w.ckpt"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(InputError, match="not a state dict"):
        load_checkpoint_file(str(tmp_path / "list.pth"))


def test_offline_pretrained_fails_fast_naming_checkpoint(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"cannot download pretrained weights.*--checkpoint"):
        create_backbone(BackboneConfig("test_resnet", pretrained=True, **CPU))
    assert time.perf_counter() - t0 < 3.0


def test_pretrained_from_local_hf_cache_works_offline(monkeypatch, tmp_path):
    """Hub weights already in the HF cache load with HF_HUB_OFFLINE=1 (real timm hub path)."""
    import huggingface_hub.constants as hf

    torch.manual_seed(5)
    src = timm.create_model("test_resnet").eval()  # the hub checkpoint has a 1000-class head
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()},
        repo / "snapshots" / commit / "model.safetensors",
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    b = create_backbone(BackboneConfig("test_resnet", pretrained=True, **CPU))
    assert b.weights["kind"] == "hub" and b.weights["tag"] == "test_resnet.r160_in1k"
    assert b.weights["hf_hub_id"] == "timm/test_resnet.r160_in1k"
    torch.testing.assert_close(b.forward(_x(b)), _reference(src, b))
    assert describe_backbone(BackboneConfig("test_resnet", pretrained=True, **CPU))[1] == b.weights


def test_no_pretrained_weights_for_model():
    with pytest.raises(InputError, match="no pretrained weights for 'test_mambaout'"):
        create_backbone(BackboneConfig("test_mambaout", pretrained=True, **CPU))


def test_image_size_override_changes_transform():
    b = create_backbone(BackboneConfig("test_resnet", image_size=64, **CPU))
    assert b.data_config["input_size"] == [3, 64, 64]
    img = draw_shape("circle", size=(100, 80))
    x = b.transform()(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert b.transform(train=True)(img).shape == (3, 64, 64)
    raw = b.transform(normalize=False)(img)
    assert raw.shape == (3, 64, 64) and raw.dtype == torch.uint8
    default = create_backbone(BackboneConfig("test_resnet", **CPU))
    assert default.transform()(img).shape == (3, 160, 160)


def test_uint8_input_matches_float_transform():
    b = create_backbone(BackboneConfig("test_vit", image_size=64, **CPU))
    imgs = [draw_shape(s, seed=i) for i, s in enumerate(["circle", "square", "triangle"])]
    xf = torch.stack([b.transform()(im) for im in imgs])
    xu = torch.stack([b.transform(normalize=False)(im) for im in imgs])
    assert torch.equal(b.forward(xf), b.forward(xu))


def test_bf16_precision_on_cpu_is_close():
    b32 = create_backbone(BackboneConfig("test_resnet", **CPU))
    b16 = create_backbone(BackboneConfig("test_resnet", precision="bf16", **CPU))
    assert b16.precision == "bf16"
    x = _x(b32)
    y16 = b16.forward(x)
    assert y16.dtype == torch.float32
    np.testing.assert_allclose(y16.numpy(), b32.forward(x).numpy(), rtol=0.1, atol=0.1)


def test_describe_matches_create(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _trained_like().state_dict().items()}, path)
    for cfg in [
        BackboneConfig("test_resnet", seed=2, **CPU),
        BackboneConfig("test_vit", image_size=96, **CPU),
        BackboneConfig("test_resnet", checkpoint=str(path), **CPU),
    ]:
        data_config, weights, precision = describe_backbone(cfg)
        b = create_backbone(cfg)
        assert (data_config, weights, precision) == (b.data_config, b.weights, b.precision)


def test_unknown_model_suggests_close_names():
    with pytest.raises(InputError, match=r"unknown timm model 'resnet_18'.*resnet18"):
        create_backbone(BackboneConfig("resnet_18", **CPU))
    with pytest.raises(InputError, match=r"unknown pretrained tag.*test_resnet\.r160_in1k"):
        create_backbone(BackboneConfig("test_resnet.bogus", **CPU))
    validate_backbone_name("test_resnet.r160_in1k")  # known name and tag: no error
    with pytest.raises(InputError, match="did you mean"):
        validate_backbone_name("tset_resnet")


def test_device_and_precision_validation():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(InputError, match="unknown precision"):
        resolve_precision("int8", torch.device("cpu"))
