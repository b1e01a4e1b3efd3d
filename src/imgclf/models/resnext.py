"""ResNeXt for CIFAR (Xie et al., "Aggregated Residual Transformations", 1611.05431, Sec. 5.3).

ResNeXt-29 (C x d): a 3x3 stem of 64 maps, three stages of three bottleneck
blocks (depth = 9n + 2) with 256/512/1024 output maps; each block is
1x1 conv (C*d) - grouped 3x3 conv (C groups) - 1x1 conv, post-activation as
ResNet, and the grouped width C*d doubles with each stage (paper Table 7's
"width of bottleneck d" is base_channels here). Shape-changing shortcuts are
1x1 conv + BN projections, as the paper's option (B).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class ResNeXtBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, group_width: int, cardinality: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, group_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(group_width)
        self.conv2 = nn.Conv2d(group_width, group_width, 3, stride=stride, padding=1, groups=cardinality,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(group_width)
        self.conv3 = nn.Conv2d(group_width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNeXt(nn.Module):
    def __init__(self, depth: int, cardinality: int, base_channels: int, initial_channels: int, in_channels: int,
                 n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, "bottleneck", family="resnext")
        if cardinality < 1:
            raise ValueError(f"model.resnext.cardinality: must be >= 1, got {cardinality}")
        if base_channels < 1:
            raise ValueError(f"model.resnext.base_channels: must be >= 1, got {base_channels}")
        self.conv = nn.Conv2d(in_channels, initial_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(initial_channels)
        stages, in_ch = [], initial_channels
        for i in range(3):
            # 64 -> 256/512/1024 for the paper's stem: a 4x expansion that doubles per stage.
            out_ch = initial_channels * 4 * 2**i
            group_width = cardinality * base_channels * 2**i
            blocks = []
            for j in range(n):
                blocks.append(ResNeXtBlock(in_ch, out_ch, group_width, cardinality,
                                           stride=2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(global_pool(x))


@register("resnext")
def resnext(*, depth=29, cardinality=8, base_channels=64, initial_channels=64, in_channels=3, n_classes=10,
            n_blocks=None):
    # n_blocks is the reference's ImageNet-style option; CIFAR models are defined by depth.
    return ResNeXt(depth, cardinality, base_channels, initial_channels, in_channels, n_classes)
