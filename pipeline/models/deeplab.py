"""DeepLab-v2 (reference §5): dilated ResNet, four parallel dilated 3x3 convs summed,
logits upsampled bilinearly (align_corners=True) to the input size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.models.resnet import ResNet, resnet101, resnet_small, resnet_small_os4

BATCHNORM_MODES = ("train", "frozen_affine", "frozen")
# The input of the caffe-trained DeepLab-v2 (AdaptSegNet, AdvEnt): BGR in 0-255 minus this mean.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


class DeepLabV2Classifier(nn.Module):
    """DeepLab-v2's "ASPP": one 3x3 conv features→K per dilation, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=d, dilation=d)
            for d in dilations
        )
        for conv in self.convs:  # DeepLab's initialisation
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.convs)


class DeepLabV2(nn.Module):
    """``model(x) -> logits [N, K, H, W]`` at the input resolution.

    ``batchnorm_mode`` (see ``set_batchnorm_mode``) is re-applied on every ``train()``
    / ``eval()`` call, including calls that reach the model through a wrapper (DDP).

    ``caffe_input``: the network was trained on caffe's input (BGR, 0-255, minus
    ``CAFFE_MEAN_BGR``); it takes the pipeline's ImageNet-normalised RGB like every other
    model and converts it first, so that the data path stays the same for all.
    """

    def __init__(self, backbone: ResNet, num_classes: int, dilations: Sequence[int], caffe_input: bool = False):
        super().__init__()
        self.backbone = backbone
        self.classifier = DeepLabV2Classifier(backbone.out_channels, num_classes, dilations)
        self.num_classes = num_classes
        self.batchnorm_mode = "train"
        self.caffe_input = caffe_input
        if caffe_input:  # rgb = x * std + mean in 0-1: caffe's BGR value = 255 * rgb - its mean
            mean_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1])
            scale = 255 * torch.tensor(IMAGENET_STD)
            shift = 255 * torch.tensor(IMAGENET_MEAN) - mean_rgb
            # not persistent: fixed by the architecture, and checkpoints keep their keys
            self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the backbone's features at the output stride, logits at the input size)."""
        size = x.shape[-2:]
        if self.caffe_input:
            x = (x * self.input_scale + self.input_shift).flip(1)  # RGB -> BGR
        features = self.backbone(x)
        logits = self.classifier(features)
        return features, F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.batchnorm_mode == "frozen":
            for bn in batchnorm_layers(self):
                bn.eval()
        return self


def deeplabv2_resnet101(num_classes: int) -> DeepLabV2:
    return DeepLabV2(resnet101(), num_classes, dilations=(6, 12, 18, 24))


def deeplabv2_small(num_classes: int) -> DeepLabV2:
    # DeepLab's dilations 6/12/18/24 are meant for a 64x128 feature map (512x1024 crops);
    # the small model sees 128x256 crops (16x32 features), so they are divided by 4 and
    # rounded up: the largest branch still spans ~40% of the feature map's height.
    return DeepLabV2(resnet_small(), num_classes, dilations=(2, 3, 5, 6))


def deeplabv2_small_os4(num_classes: int) -> DeepLabV2:
    """The built-in benchmark's model: the small one at output stride 4 (32x64 features
    for 128x256 frames), its dilations doubled to span the same share of the image."""
    return DeepLabV2(resnet_small_os4(), num_classes, dilations=(4, 6, 10, 12))


def deeplabv2_resnet101_advent(num_classes: int) -> DeepLabV2:
    """AdvEnt's DeepLab-v2 (advent/model/deeplabv2.py, its layer6): the caffe-style
    ResNet-101 on caffe's input, the four branches summed."""
    return DeepLabV2(resnet101(caffe=True), num_classes, (6, 12, 18, 24), caffe_input=True)


def deeplabv2_resnet101_adaptsegnet(num_classes: int) -> DeepLabV2:
    """AdaptSegNet's DeepLab-v2 (model/deeplab_multi.py, its layer6) as it computes: its
    Classifier_Module returns inside the loop, after the first two branches (dilation 6
    and 12), so the released weights were trained with those two only."""
    return DeepLabV2(resnet101(caffe=True), num_classes, (6, 12), caffe_input=True)


ARCHS = {
    "deeplabv2_resnet101": deeplabv2_resnet101,
    "deeplabv2_resnet101_adaptsegnet": deeplabv2_resnet101_adaptsegnet,
    "deeplabv2_resnet101_advent": deeplabv2_resnet101_advent,
    "deeplabv2_small": deeplabv2_small,
    "deeplabv2_small_os4": deeplabv2_small_os4,
}


def build_model(arch: str, num_classes: int) -> DeepLabV2:
    """A freshly initialised model (load weights with ``pipeline.models.weights``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}: choose one of {sorted(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return ARCHS[arch](num_classes)


def param_groups(model: DeepLabV2, lr: float) -> list[dict]:
    """Optimiser groups of the released code: backbone at 0.1 x lr, classifier at lr.

    Every parameter is listed, also those with requires_grad=False (frozen BN affine):
    the optimiser skips parameters without gradients, and a later mode change needs no
    new optimiser.
    """
    return [
        {"name": "backbone", "params": list(model.backbone.parameters()), "lr": 0.1 * lr},
        {"name": "classifier", "params": list(model.classifier.parameters()), "lr": lr},
    ]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm))]


def set_batchnorm_mode(model: DeepLabV2, mode: str) -> None:
    """How batch norm behaves in training.

    - "train": affine parameters trained, batch statistics in train mode (running
      statistics updated);
    - "frozen_affine": affine parameters fixed (requires_grad=False), but batch
      statistics still used and running statistics updated in train mode: what the
      released IAST code ("FREEZEBN") does;
    - "frozen": affine parameters fixed and the layers kept in eval mode (running
      statistics used and never updated), whatever ``model.train()`` says.
    """
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"unknown batch-norm mode {mode!r}: choose one of {list(BATCHNORM_MODES)}")
    if not isinstance(model, DeepLabV2):
        raise TypeError(
            f"set_batchnorm_mode needs the DeepLabV2 itself, got {type(model).__name__} "
            "(pass model.module for a DDP-wrapped model)"
        )
    model.batchnorm_mode = mode
    for bn in batchnorm_layers(model):
        for p in bn.parameters():
            p.requires_grad_(mode == "train")
    model.train(model.training)
