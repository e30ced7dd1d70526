"""Fine-tuning throughput: carrot's training step (`pipeline.finetune.loop.Finetuner`) against a
bare timm training loop for the same model and batch, on the same tensors, in the same run.

Bare loop: ``timm.create_model(MODEL, num_classes=C)``, AdamW over all parameters,
cross-entropy, backward, step (channels_last and bf16 autocast on CUDA). carrot: the same
backbone under its LayerNorm + Linear head, with layer-wise lr decay groups, the scheduled lr,
and the augmentation in the loop (none, then CARROT). Image decoding is in neither (the batch is
made once); rows: median seconds per step after warm-up, images/s, and the ratio to the bare loop.

    python -m benchmarks.finetune [--device cpu|cuda] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from benchmarks._report import median_time, write_report
from pipeline.embed.backbone import BackboneConfig
from pipeline.finetune.loop import Finetuner
from pipeline.finetune.settings import FinetuneSettings
from pipeline.heads.bank import Head
from pipeline.heads.io import save_head

DEFAULT_JSON = Path(__file__).parent / "results" / "finetune.json"
MODEL, BATCH, CLASSES = "vit_tiny_patch16_224", 32, 10  # digits' 10 classes (the tuner's data)


def _bare_step(device: torch.device, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=CLASSES).to(device).train()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.05)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step() -> None:
        xb = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()

    return step


def _carrot_step(device: torch.device, x: torch.Tensor, y: torch.Tensor, aug: str, folder: Path):
    head_dir = folder / "head"
    if not head_dir.exists():
        save_head(Head(192, CLASSES), head_dir, class_names=[str(c) for c in range(CLASSES)])
    settings = FinetuneSettings(
        data="sklearn:digits",
        backbone=BackboneConfig(name=MODEL, device=str(device)),
        init_head=str(head_dir),  # no probe pass: only the step is timed
        batch_size=BATCH,
        aug=aug,
        workers=0,
    )
    tuner = Finetuner(settings, folder / f"run-{aug}")
    noise = torch.Generator(device=device).manual_seed(0)
    return lambda: tuner.train_step(x, y, noise)


def measure(device: torch.device, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            ("bare timm loop (baseline)", lambda: _bare_step(device, x, y)),
            ("carrot finetune, aug none", lambda: _carrot_step(device, x, y, "none", Path(tmp))),
            ("carrot finetune, CARROT", lambda: _carrot_step(device, x, y, "carrot", Path(tmp))),
        ]
        for name, build in paths:
            seconds = median_time(build(), repeats=repeats, warmup=2)
            rows.append({"path": name, "s_per_step": seconds, "images_per_s": BATCH / seconds})
    base = rows[0]["s_per_step"]
    for row in rows:
        row["vs_bare"] = base / row["s_per_step"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(device, args.repeats)
    write_report(
        f"fine-tune step: {MODEL}, batch {BATCH}, {device.type}"
        + (" (bf16 autocast, channels_last)" if device.type == "cuda" else " (fp32)"),
        rows,
        json_path=args.json,
        extra={"model": MODEL, "batch": BATCH, "device": device.type},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
