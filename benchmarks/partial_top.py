"""Partially frozen training: a training step over cached tokens vs running the frozen trunk
(under ``no_grad``) and then the same trainable top, on the same batch, in the same run.

Model: ``vit_tiny_patch16_224`` (random init, 224 px, 12 blocks), last ``--blocks`` trainable
with a LayerNorm + Linear head (200 classes), AdamW, batch 32. Rows: median seconds per step of
each path after warm-up, and the ratio (target: the cached path ≥ 3× faster on this CPU).

    python -m benchmarks.partial_top [--blocks 1] [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._report import median_time, write_report
from pipeline.embed.backbone import BackboneConfig, create_backbone
from pipeline.embed.cache_point import cached_activations
from pipeline.heads.top import PartialTop, trainable_parameters

DEFAULT_JSON = Path(__file__).parent / "results" / "partial_top.json"
MODEL, BATCH, CLASSES = "vit_tiny_patch16_224", 32, 200


def measure(blocks: int, repeats: int) -> list[dict]:
    cfg = BackboneConfig(name=MODEL, cache_at=blocks, device="cpu")
    model = create_backbone(cfg).model
    top = PartialTop(model, cached=blocks, trainable=blocks, num_classes=CLASSES)
    trainable_parameters(top)
    top.train()
    optim = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 224, 224, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    with torch.no_grad():
        tokens = cached_activations(model, images, blocks)  # what the store holds

    def step(x: torch.Tensor) -> None:
        loss = F.cross_entropy(top.fc(top.head_input(x)), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    def from_cache() -> None:
        step(tokens)

    def through_trunk() -> None:
        with torch.no_grad():
            x = cached_activations(model, images, blocks)  # the frozen trunk, every step
        step(x)

    cached = median_time(from_cache, repeats=repeats, warmup=2)
    full = median_time(through_trunk, repeats=repeats, warmup=2)
    return [
        {"path": "full backbone + trainable top (baseline)", "s_per_step": full, "speedup": 1.0},
        {"path": "cached tokens + trainable top", "s_per_step": cached, "speedup": full / cached},
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    rows = measure(args.blocks, args.repeats)
    write_report(
        f"partially frozen step: {MODEL}, last {args.blocks} block(s) trainable, batch {BATCH}",
        rows,
        json_path=args.json,
        extra={"model": MODEL, "blocks": args.blocks, "batch": BATCH, "target": 3.0},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
