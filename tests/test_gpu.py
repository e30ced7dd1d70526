"""CUDA checks (skipped without a GPU): the same guarantees on the device users train on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_backbone_bf16_on_cuda_matches_cpu_fp32():
    from pipeline.embed.backbone import BackboneConfig, create_backbone

    x = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cpu = create_backbone(BackboneConfig(name="resnet18", device="cpu")).forward(x)
    gpu_bb = create_backbone(BackboneConfig(name="resnet18", device="cuda"))
    assert gpu_bb.precision in ("bf16", "fp16")
    gpu = gpu_bb.forward(x.cuda()).float().cpu()
    cos = torch.nn.functional.cosine_similarity(cpu, gpu, dim=1)
    assert cos.min() > 0.99


def test_embed_on_cuda_writes_a_verified_store(shapes_folder, tmp_path):
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, run_embedding
    from stores import verify_store

    s = run_embedding(
        EmbedSettings(
            data=str(shapes_folder),
            root=str(tmp_path),
            backbone=BackboneConfig(name="test_resnet", device="cuda"),
            extract=ExtractConfig(batch_size=8, views=1),
        )
    )
    assert verify_store(s.store).ok and len(s.skipped) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sample", "class"])
def test_carrot_exact_and_safe_on_cuda(dtype, mode):
    from pipeline.augment.carrot import CarrotConfig, carrot_augment

    g = torch.Generator(device="cuda").manual_seed(0)
    B, D, C = 512, 256, 100
    W = torch.randn(C, D, device="cuda", generator=g)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    z = torch.randn(B, D, device="cuda", generator=g) + 3 * W[y] / W[y].norm(dim=1, keepdim=True)
    z = z.to(dtype)
    logits = z.float() @ W.T
    out = carrot_augment(z, y, logits, W, CarrotConfig(mode=mode, topk=10), generator=g)
    assert torch.isfinite(out.alpha).all() and (out.alpha >= 0).all()
    assert out.z.dtype == dtype and out.z.device.type == "cuda"
    if len(out.y):
        src = out.source
        m0 = logits[src].gather(1, out.y[:, None]) - logits[src]
        m1 = out.z.float() @ W.T
        m1 = m1.gather(1, out.y[:, None]) - m1
        assert ((m1 > 0) | (m0 <= 0)).float().mean() > 0.9  # nearly all labels kept


def test_head_bank_trains_on_cuda():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from pipeline.heads.bank import HeadGrid
    from pipeline.heads.features import FeatureSet
    from pipeline.heads.search import train_head_bank
    from pipeline.heads.train import TrainConfig

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(
        X.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y
    )
    fs = FeatureSet.from_arrays({"train": (Xtr, ytr), "test": (Xte, yte)}, device="cuda")
    grid = HeadGrid.from_lists(
        lrs=(1e-2, 3e-2),
        weight_decays=(1e-4, 1e-2),
        augmentations=(("none", None), ("carrot", None)),
    )
    result = train_head_bank(fs, grid, TrainConfig(epochs=30, device="cuda"))
    assert result.test["top1"] > 0.9
