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


def check_carrot_exact_and_safe(device: str, dtype: torch.dtype, mode: str) -> None:
    """CARROT on ``device``: Kset margins unchanged (up to the rounding of z̃ to ``dtype``) and
    the copies with any margin < 0 below the binomial(M, δ) upper quantile (error 1e-6)."""
    from binomial_bounds import binomial_upper

    from pipeline.augment.carrot import CarrotConfig, carrot_augment
    from pipeline.augment.nuisance import centered_weight, nearest_classes, top_competitors

    g = torch.Generator(device=device).manual_seed(0)
    B, D, C, K = 512, 256, 100, 10
    W = torch.randn(C, D, device=device, generator=g)
    y = torch.randint(0, C, (B,), device=device, generator=g)
    z = torch.randn(B, D, device=device, generator=g) + 3 * W[y] / W[y].norm(dim=1, keepdim=True)
    z = z.to(dtype)
    logits = z.float() @ W.T
    cfg = CarrotConfig(mode=mode, topk=K, aug_per_sample=20)
    out = carrot_augment(z, y, logits, W, cfg, generator=g)
    assert torch.isfinite(out.alpha).all() and (out.alpha >= 0).all()
    assert out.z.dtype == dtype and out.z.device.type == torch.device(device).type
    assert len(out.y) > 0, "the geometry should leave rows eligible"
    assert torch.equal(out.y, y[out.source])

    def margins(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lg = x.double() @ W.double().T
        return (lg.gather(1, labels[:, None]) - lg).scatter(1, labels[:, None], float("inf"))

    if mode == "sample":
        kset = top_competitors(logits, y, K)[out.source]
    else:
        wc = centered_weight(W)
        kset = nearest_classes(wc @ wc.T, K)[out.y]
    before = margins(z, y)[out.source].gather(1, kset)
    after = margins(out.z, out.y).gather(1, kset)
    diff = (W.double()[out.y][:, None, :] - W.double()[kset]).abs()  # (M, K, D)
    rounding = 2 * torch.finfo(dtype).eps * (diff * out.z.double().abs()[:, None, :]).sum(-1)
    assert ((after - before).abs() <= 1e-4 * (1 + before.abs()) + rounding).all()
    bad = (margins(out.z, out.y) < 0).any(dim=1)
    limit = binomial_upper(len(out.y), cfg.delta, 1e-6)
    assert int(bad.sum()) <= limit, (int(bad.sum()), len(out.y), limit)
    assert float(out.diagnostics["violation_rate"]) == pytest.approx(
        float(bad.double().mean()), abs=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sample", "class"])
def test_carrot_exact_and_safe_on_cuda(dtype, mode):
    check_carrot_exact_and_safe("cuda", dtype, mode)


@pytest.mark.parametrize("topk", [3, 9])  # 9 = C − 1: the shared-basis path
def test_carrot_heads_batch_on_cuda_equals_head_by_head(topk):
    """`carrot_augment_heads` on the GPU (the stacked-weight GEMM projection) against
    head-by-head `carrot_augment` there, with the same per-head generators."""
    from pipeline.augment.carrot import CarrotConfig, carrot_augment
    from pipeline.augment.carrot_heads import carrot_augment_heads
    from pipeline.augment.nuisance import linear_logits_error

    dev, h, b, d, c = "cuda", 3, 128, 64, 10
    g = torch.Generator().manual_seed(0)
    w = torch.randn(h, c, d, generator=g).to(dev)
    y = torch.randint(0, c, (b,), generator=g).to(dev)
    z = (2.0 * w[:, y] + 0.4 * torch.randn(h, b, d, generator=g).to(dev)).contiguous()
    logits = torch.stack([z[i] @ w[i].T for i in range(h)])
    err = torch.stack([linear_logits_error(z[i], w[i]) for i in range(h)])
    cfg = CarrotConfig(topk=topk)

    def gens():
        return [torch.Generator(device=dev).manual_seed(10 + i) for i in range(h)]

    out = carrot_augment_heads(z, y, logits, w, cfg, logits_error=err, generators=gens())
    for i, gen in enumerate(gens()):
        ref = carrot_augment(
            z[i], y, logits[i], w[i], cfg, generator=gen, logits_error=err[i], measure=False
        )
        torch.testing.assert_close(out.alpha[i], ref.alpha, rtol=1e-5, atol=0)
        rows = torch.nonzero(out.augmented[i]).squeeze(1)
        assert torch.equal(rows, ref.source)
        torch.testing.assert_close(out.delta[i, rows], ref.delta, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_amp_on_cuda_trains_and_resumes(tmp_path, precision):
    """AMP fine-tuning (bf16; fp16 with the grad scaler, whose state the checkpoint keeps)."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.finetune.checkpoint import load_checkpoint
    from pipeline.finetune.loop import Finetuner, finetune
    from pipeline.finetune.settings import FinetuneSettings

    settings = FinetuneSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name="test_vit", image_size=32, device="cuda", precision=precision),
        epochs=2,
        batch_size=64,
        lr=1e-4,
        workers=0,
        aug="carrot",
    )

    def stop(_metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(settings, tmp_path / "run", on_epoch=stop)
    saved = load_checkpoint(tmp_path / "run")
    assert (saved["scaler"] is not None) == (precision == "fp16")
    tuner = Finetuner(settings, tmp_path / "run", resume=True)
    assert tuner.precision == precision and tuner.step == saved["step"]
    tuner.run_epoch()
    summary = tuner.finish()
    assert all(np.isfinite(h["train_loss"]) for h in summary["history"])
    assert summary["history"][0]["aug_rows"] > 0
