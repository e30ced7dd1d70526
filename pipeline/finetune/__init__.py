"""End-to-end fine-tuning of backbone + head with an augmentation (CARROT) in the loop.

``settings`` (what one run is) → ``data`` (images, timm's training transform, seeded per image
and epoch) → ``model`` (timm backbone + LayerNorm/Linear head, warm start, export) → ``optim``
(layer-wise lr decay groups, the step-indexed schedule) → ``checkpoint`` (save, check, resume) →
``loop`` (the epoch loop: AMP, accumulation, EMA, CARROT diagnostics) — no Prefect;
``flows.finetune`` wires it into a flow.
"""

from pipeline._lazy import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(
    __name__,
    {
        "FinetuneSettings": "settings",
        "FinetuneModel": "model",
        "Finetuner": "loop",
        "finetune": "loop",
        "load_checkpoint": "checkpoint",
    },
)
