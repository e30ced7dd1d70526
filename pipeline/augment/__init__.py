"""Feature-space augmentations in the post-LayerNorm space of a head.

``base`` (the interface every augmentation implements) · ``carrot`` and ``nuisance`` (CARROT and
its geometry, docs/CARROT.md) · ``carrot_heads`` (CARROT for all the heads of a bank group in
one call) · ``peers`` (none, gaussian, isda, dc, mixup: the baselines CARROT is
compared with) · ``registry`` (names → settings and factories). Nothing here imports stage 2.
"""

from pipeline._lazy import lazy_surface

__getattr__, __dir__, __all__ = lazy_surface(
    __name__,
    {
        "AugmentedBatch": "base",
        "FeatureAugmentation": "base",
        "CarrotConfig": "carrot",
        "CarrotAugment": "carrot",
        "CarrotOutput": "carrot",
        "carrot_augment": "carrot",
        "carrot_augment_pre_ln": "carrot",
        "carrot_loss": "carrot",
        "class_factor_from_features": "carrot",
        "carrot_augment_heads": "carrot_heads",
        "HeadsOutput": "carrot_heads",
        "GaussianSettings": "peers",
        "IsdaSettings": "peers",
        "DCSettings": "peers",
        "MixupSettings": "peers",
        "ClassStats": "peers",
        "normalize": "peers",
        "augmentation_names": "registry",
        "create_augmentation": "registry",
        "default_settings": "registry",
        "settings_class": "registry",
        "settings_from_dict": "registry",
    },
)
