"""CIFAR ResNets (He et al. 2016, 3 stages) and the ImageNet-style ResNet50 adapted to 32 px.

Module names and shapes follow RepDistiller's ``models/resnet.py`` / ``models/resnetv2.py`` so
their published checkpoints load with ``load_model_weights``. Global pooling is adaptive, so any
input size (28, 32, 64 px, ...) works; on 32 px it equals RepDistiller's fixed ``AvgPool2d(8)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import init_weights


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """3-stage ResNet: depth = 6n + 2 (basic blocks) or 9n + 2 (bottlenecks)."""

    def __init__(self, depth: int, num_filters: list[int], block_name: str = "basicblock",
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6:
                raise ValueError(f"depth must be 6n+2 for BasicBlock ResNets, got {depth}")
            n, block = (depth - 2) // 6, BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"depth must be 9n+2 for Bottleneck ResNets, got {depth}")
            n, block = (depth - 2) // 9, Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_resnet(depth: int, filters: list[int]):
    def build(num_classes: int = 100, in_channels: int = 3, **_: object) -> CifarResNet:
        return CifarResNet(depth, filters, "basicblock", num_classes, in_channels)
    build.__doc__ = f"CIFAR ResNet-{depth}, stage widths {filters}."
    return build


resnet8 = _cifar_resnet(8, [16, 16, 32, 64])
resnet14 = _cifar_resnet(14, [16, 16, 32, 64])
resnet20 = _cifar_resnet(20, [16, 16, 32, 64])
resnet32 = _cifar_resnet(32, [16, 16, 32, 64])
resnet44 = _cifar_resnet(44, [16, 16, 32, 64])
resnet56 = _cifar_resnet(56, [16, 16, 32, 64])
resnet110 = _cifar_resnet(110, [16, 16, 32, 64])
resnet8x4 = _cifar_resnet(8, [32, 64, 128, 256])
resnet32x4 = _cifar_resnet(32, [32, 64, 128, 256])


# ---- ImageNet-style ResNet on CIFAR (RepDistiller resnetv2: 3x3 stem, no max-pool) ----------
class _V2Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * 4, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * _V2Bottleneck.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(_V2Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * _V2Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def ResNet50(num_classes: int = 100, in_channels: int = 3, **_: object) -> ResNetV2:
    """ResNet-50 (bottleneck [3, 4, 6, 3]) with a CIFAR stem."""
    return ResNetV2([3, 4, 6, 3], num_classes, in_channels)
