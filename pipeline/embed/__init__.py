"""Stage 1: images → embeddings in a Zarr store.

``sources`` (image sets and their records) → ``splits`` (train/val/test) → ``images``
(decoding) → ``backbone`` and ``weights`` (a timm model and its checkpoint) → ``extract``
(batched forward passes) → ``run`` (plans and writes the store, resumably).
"""

from pipeline._lazy import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(
    __name__,
    {
        "ImageSource": "sources",
        "ImageRecord": "sources",
        "resolve_source": "sources",
        "assign_splits": "splits",
        "load_rgb": "images",
        "ImageLoadError": "images",
        "BackboneConfig": "backbone",
        "Backbone": "backbone",
        "create_backbone": "backbone",
        "resolve_device": "backbone",
        "load_checkpoint_file": "weights",
        "ExtractConfig": "extract",
        "extract_rows": "extract",
        "EmbedSettings": "run",
        "EmbedSummary": "run",
        "run_embedding": "run",
    },
)
