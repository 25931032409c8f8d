"""Shared helpers for the CIFAR model zoo."""
from __future__ import annotations

import math

import torch.nn as nn


def init_weights(model: nn.Module) -> None:
    """He-normal convs (fan_out), unit BN, zero biases, linear weights uniform in ±1/sqrt(fan_in).

    Close to RepDistiller's init, not the same (the architectures are: same parameter names,
    shapes and outputs): its CIFAR ResNets keep PyTorch's random default classifier bias, its VGG
    and MobileNetV2 draw the classifier from N(0, 0.01), and its ShuffleNets keep PyTorch's default
    conv init. Every conv is followed by BatchNorm, so the effect on accuracy should be small; it
    has not been measured."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ChannelShuffle(nn.Module):
    """[N, C, H, W] -> interleave the channels of ``groups`` groups (ShuffleNet)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
