"""VGG with batch norm for 32 px inputs, as in RepDistiller's ``vgg.py`` (vgg8 = their 'S' cfg).

Five conv blocks separated by max-pools; the fourth pool only runs for inputs of 64 px and up
(as RepDistiller does for 64 px data) so every size ends with a small map before global pooling.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import init_weights

CFGS = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, kernel_size=3, padding=1), nn.BatchNorm2d(w),
                   nn.ReLU(inplace=True)]
        in_channels = w
    # The block's last ReLU is applied in forward(), after the block, as in RepDistiller (whose
    # feature distillers read the pre-activation); dropping it keeps the Sequential indices equal.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_pool3 = x.shape[-2] >= 64
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if use_pool3:
            x = self.pool3(x)
        x = self.pool4(F.relu(self.block4(x)))
        return self.classifier(torch.flatten(x, 1))


def _vgg(key: str, depth: int):
    def build(num_classes: int = 100, in_channels: int = 3, **_: object) -> VGG:
        return VGG(CFGS[key], num_classes, in_channels)
    build.__doc__ = f"VGG-{depth} with batch norm."
    return build


vgg8 = _vgg("S", 8)
vgg11 = _vgg("A", 11)
vgg13 = _vgg("B", 13)
vgg16 = _vgg("D", 16)
vgg19 = _vgg("E", 19)
