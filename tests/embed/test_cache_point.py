"""``--cache-at block:-N``: what enters the last N blocks (ViT tokens; ResNet and ConvNeXt
feature maps, a block being a stage), stored flattened; the model's own top (last N blocks, final
norm, pooling) over them gives back the backbone's pooled embeddings; the store records the cache
point; models and cache points that cannot are one-line errors."""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline.embed.backbone import BackboneConfig, create_backbone, embedding_dim, row_shape
from pipeline.embed.cache_point import (
    cached_activations,
    chunk_rows_for,
    model_top,
    parse_cache_at,
)
from pipeline.embed.extract import ExtractConfig
from pipeline.embed.run import EmbedSettings, run_embedding
from pipeline.errors import InputError
from stores import open_store


def test_cache_points_parse_and_bad_ones_name_the_option():
    assert (parse_cache_at(None), parse_cache_at("block:-1"), parse_cache_at("block:-3")) == (
        0,
        1,
        3,
    )
    for bad in ("block:1", "block:-0", "block:-x", "layer:-1", "3"):
        with pytest.raises(InputError, match="--cache-at"):
            parse_cache_at(bad)
    with pytest.raises(InputError, match="does not take --features"):
        BackboneConfig(name="test_vit", cache_at=1, features="cls+avgpool")


@pytest.mark.parametrize("blocks", [1, 2])
def test_the_models_top_over_cached_activations_gives_its_pooled_embedding(blocks):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    x = torch.randn(4, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = cached_activations(model, x, blocks)
        assert tokens.shape == (4, model.patch_embed.num_patches + model.num_prefix_tokens, 64)
        torch.testing.assert_close(model_top(model, blocks)(tokens), model(x))


def test_store_of_tokens_round_trips_to_the_pooled_store(tmp_path):
    def settings(**backbone) -> EmbedSettings:
        return EmbedSettings(
            data="sklearn:digits",
            backbone=BackboneConfig(name="test_vit", image_size=32, **backbone),
            extract=ExtractConfig(batch_size=64, num_workers=0),
            root=str(tmp_path),
            dtype="float32",
            chunk_rows=512,
        )

    cfg = settings(cache_at=1).backbone
    assert row_shape(cfg) == (5, 64) and embedding_dim(cfg) == 320
    tokens = open_store(run_embedding(settings(cache_at=1)).store)
    pooled = open_store(run_embedding(settings()).store)
    extra = tokens.identity.extra
    assert extra["cache_at"] == "block:-1" and extra["tokens"] == [5, 64]
    assert tokens.key != pooled.key and tokens.dim == 320
    rows = torch.from_numpy(tokens.features()[:200])
    backbone = create_backbone(cfg)  # same seed, same weights as the store's
    with torch.no_grad():
        again = model_top(backbone.model, 1)(rows.view(-1, *extra["tokens"]))
    want = torch.from_numpy(pooled.features()[:200])
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)


def test_models_and_points_that_cannot_are_refused():
    with pytest.raises(InputError, match=r"'test_efficientnet' .* not a family .* ResNet"):
        create_backbone(BackboneConfig(name="test_efficientnet", cache_at=1))
    with pytest.raises(InputError, match="at most block:-5"):
        embedding_dim(BackboneConfig(name="test_vit", cache_at=6))
    with pytest.raises(InputError, match="has 4 stages; cache at most block:-3"):
        embedding_dim(BackboneConfig(name="test_resnet", cache_at=4))


def test_token_caches_get_chunks_of_about_64_mib():
    assert chunk_rows_for(257 * 384, 2) == 340  # ViT-S/14 at 224 px, float16
    assert chunk_rows_for(64, 2) == 1024 and chunk_rows_for(10**9, 4) == 1
