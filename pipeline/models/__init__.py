"""Segmentation models (DeepLab-v2) and weight loading."""

from pipeline.models.deeplab import (
    ARCHS,
    BATCHNORM_MODES,
    DeepLabV2,
    build_model,
    param_groups,
    set_batchnorm_mode,
)
from pipeline.models.weights import (
    load_checkpoint,
    load_iast_checkpoint,
    load_imagenet_backbone,
    load_released_checkpoint,
    save_checkpoint,
)

__all__ = [
    "ARCHS",
    "BATCHNORM_MODES",
    "DeepLabV2",
    "build_model",
    "load_checkpoint",
    "load_iast_checkpoint",
    "load_imagenet_backbone",
    "load_released_checkpoint",
    "param_groups",
    "save_checkpoint",
    "set_batchnorm_mode",
]
