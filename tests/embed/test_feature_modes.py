"""``--features``: DINOv2-style token features (class tokens of the last N blocks + the mean
patch token) from timm's ``forward_intermediates``, checked against timm's own
``forward_features``; their own store key; clear errors for models and modes that cannot."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.embed.backbone import BackboneConfig, create_backbone, embedding_dim
from pipeline.embed.feature_modes import check_model, embed, last_blocks
from pipeline.embed.run import EmbedSettings, plan_embedding, resolve_settings_source
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0).eval()


def test_modes_parse_and_bad_ones_name_the_option():
    assert (last_blocks("pooled"), last_blocks("cls+avgpool"), last_blocks("last:4")) == (0, 1, 4)
    for bad in ("last:0", "last:", "last:x", "cls", "avg", ""):
        with pytest.raises(InputError, match="--features"):
            last_blocks(bad)
    with pytest.raises(InputError, match="--features"):
        BackboneConfig(name="test_vit", features="last:-1")


def test_token_features_match_timms_forward_features(vit):
    x = torch.randn(3, 3, *vit.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = vit.forward_features(x)  # (B, P + T, D), after the final norm
        d, p = tokens.shape[-1], vit.num_prefix_tokens
        two = embed(vit, x, "cls+avgpool")
        assert two.shape == (3, 2 * d)
        torch.testing.assert_close(two[:, :d], tokens[:, 0])
        torch.testing.assert_close(two[:, d:], tokens[:, p:].mean(dim=1))
        three = embed(vit, x, "last:2")
        assert three.shape == (3, 3 * d)
        torch.testing.assert_close(three[:, d:], two)  # the last block's cls, then the patch mean
        assert not torch.allclose(three[:, :d], three[:, d : 2 * d])  # an earlier block's cls
        torch.testing.assert_close(embed(vit, x, "pooled"), vit(x))


def test_backbone_width_and_meta_width_agree():
    cfg = BackboneConfig(name="test_vit", image_size=32, features="last:3")
    backbone = create_backbone(cfg)
    assert backbone.dim == embedding_dim(cfg) == 4 * 64
    out = backbone(torch.zeros(2, *backbone.input_size, dtype=torch.uint8))
    assert out.shape == (2, 256) and torch.isfinite(out).all()


def test_models_that_cannot_are_refused(vit):
    with pytest.raises(InputError, match="has no class token"):
        create_backbone(BackboneConfig(name="test_resnet", features="cls+avgpool"))
    with pytest.raises(InputError, match="use last:"):
        check_model(vit, f"last:{len(vit.blocks) + 1}", "test_vit")


def test_token_stores_have_their_own_key_and_pooled_keys_are_unchanged():
    def key(features: str) -> tuple[str, dict]:
        settings = EmbedSettings(
            data="sklearn:digits", backbone=BackboneConfig(name="test_vit", features=features)
        )
        plan = plan_embedding(settings, resolve_settings_source(settings))
        return plan.identity.key(), plan.identity.extra

    pooled, extra = key("pooled")
    assert "features" not in extra  # stores written before --features keep their key
    tokens, extra = key("cls+avgpool")
    assert extra["features"] == "cls+avgpool" and tokens != pooled != key("last:2")[0]
