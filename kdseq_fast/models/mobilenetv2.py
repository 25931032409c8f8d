"""MobileNetV2 for CIFAR as used by RepDistiller (``mobile_half``: expansion 6, width 0.5)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import init_weights


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


def _conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        setting = [  # t, c, n, s
            [1, 16, 1, 1], [expansion, 24, 2, 1], [expansion, 32, 3, 2], [expansion, 64, 4, 2],
            [expansion, 96, 3, 1], [expansion, 160, 3, 2], [expansion, 320, 1, 1]]
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn(in_channels, cin, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_1x1_bn(cin, self.last_channel)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobile_half(num_classes: int = 100, in_channels: int = 3, **_: object) -> MobileNetV2:
    """RepDistiller's 'MobileNetV2' student: expansion 6, width multiplier 0.5."""
    return MobileNetV2(6, 0.5, num_classes, in_channels)


def mobile_full(num_classes: int = 100, in_channels: int = 3, **_: object) -> MobileNetV2:
    """Full-width MobileNetV2 (expansion 6, width 1.0)."""
    return MobileNetV2(6, 1.0, num_classes, in_channels)
