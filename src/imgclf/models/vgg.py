"""VGG-like network with batch normalization (Simonyan & Zisserman, 1409.1556; BN: 1502.03167).

Stages of 3x3 conv(-BN)-ReLU layers, each followed by 2x2 max pooling, then one
linear classifier, as the reference README's "vgg-like" CIFAR model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register


def _stage(in_ch: int, out_ch: int, n_layers: int, use_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_layers):
        # A bias even before BN (which cancels it), as the reference code: same parameter count.
        layers.append(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1))
        if use_bn:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    # ceil_mode: five halvings of 28x28 (MNIST) would otherwise reach 0x0; on 32x32 it changes nothing.
    layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, n_channels: list[int], n_layers: list[int], use_bn: bool, in_channels: int,
                 n_classes: int):
        super().__init__()
        if len(n_channels) != len(n_layers) or not n_channels:
            raise ValueError(f"model.vgg.n_layers: expected one entry per stage of model.vgg.n_channels "
                             f"({len(n_channels)}), got {n_layers}")
        if any(n < 1 for n in n_layers):
            raise ValueError(f"model.vgg.n_layers: every stage needs at least one layer, got {n_layers}")
        stages, in_ch = [], in_channels
        for width, depth in zip(n_channels, n_layers):
            stages.append(_stage(in_ch, width, depth, use_bn))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On 32x32 inputs five stages leave 1x1 maps, so pooling equals the reference's flatten.
        x = F.adaptive_avg_pool2d(self.stages(x), 1)
        return self.fc(torch.flatten(x, 1))


@register("vgg")
def vgg(*, n_channels=(64, 128, 256, 512, 512), n_layers=(2, 2, 3, 3, 3), use_bn=True, in_channels=3,
        n_classes=10):
    return VGG(list(n_channels), list(n_layers), use_bn, in_channels, n_classes)
