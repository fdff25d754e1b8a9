"""Dilated ResNet with torchvision's parameter names.

The names (conv1, bn1, layer1..layer4, each block's conv1/bn1/.../downsample.0/1) are
torchvision's, so its ImageNet checkpoint ``resnet101-*.pth`` loads as it is (its fc.*
dropped). Dilation follows torchvision's ``replace_stride_with_dilation``: a dilated
stage drops its stride 2, its first block keeps the previous dilation and the others
use the doubled one.

``caffe=True`` builds the original DeepLab-v2 ResNet that AdaptSegNet and AdvEnt train
(their model/deeplab_multi.py, advent/model/deeplabv2.py): a bottleneck's stride in its
first 1x1 conv, every block of a dilated stage at that stage's dilation, and a max-pool
that rounds up (ceil_mode). The parameter names and shapes are the same as torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride,
                     padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs. Unlike torchvision's, it accepts dilation (for the small backbone)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride and dilation here, torchvision's "v1.5") → 1x1, 4x expansion."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1, stride_in_1x1: bool = False):
        super().__init__()
        stride1, stride3 = (stride, 1) if stride_in_1x1 else (1, stride)  # caffe: the 1x1 strides
        self.conv1 = conv1x1(inplanes, planes, stride1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride3, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without avgpool/fc: image (N, 3, H, W) → last stage's feature map.

    ``widths`` are the four stages' planes (torchvision: 64, 128, 256, 512; the stem has
    widths[0] channels). The default dilation gives output stride 8, as DeepLab-v2.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512),
                 replace_stride_with_dilation: Sequence[bool] = (False, True, True), caffe: bool = False):
        super().__init__()
        self.inplanes = widths[0]
        self.dilation = 1
        self.caffe = caffe
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=caffe)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, widths[2], layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, widths[3], layers[3], 2, replace_stride_with_dilation[2])
        self.out_channels = widths[3] * block.expansion
        self.output_stride = 32 // 2 ** sum(map(bool, replace_stride_with_dilation))

        # torchvision's initialisation (zero_init_residual=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first_dilation = self.dilation if self.caffe else previous_dilation
        caffe = {"stride_in_1x1": True} if self.caffe and block is Bottleneck else {}
        layers = [block(self.inplanes, planes, stride, downsample, first_dilation, **caffe)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet101(caffe: bool = False) -> ResNet:
    """torchvision's ResNet-101 (or DeepLab's caffe-style one), layer3/layer4 dilated 2/4
    (output stride 8)."""
    return ResNet(Bottleneck, (3, 4, 23, 3), caffe=caffe)


def resnet_small() -> ResNet:
    """A narrow, shallow ResNet of the same layout (BasicBlock, one per stage, widths
    16/32/64/128, output stride 8) for CPU runs and tests: 0.31 M parameters."""
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128))


def resnet_small_os4() -> ResNet:
    """The small ResNet at output stride 4 (every stage after the first dilated) and
    narrower in its last two stages (48, 64) to pay for it: 0.17 M parameters, 0.7x the
    stride-8 model's training speed. At the built-in benchmark's 256x128 a stride-8
    feature map is 32x16, coarser than a pole or a far person (docs/benchmark.md)."""
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 48, 64),
                  replace_stride_with_dilation=(True, True, True))
