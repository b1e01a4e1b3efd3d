"""ResNet for CIFAR (He et al., "Deep Residual Learning for Image Recognition", 1512.03385, Sec. 4.2).

Post-activation units (conv-BN-ReLU-conv-BN, add, ReLU), three stages of
16/32/64 channels, depth 6n+2 (basic) or 9n+2 (bottleneck, 4x expansion).
Where a unit changes shape the shortcut is a 1x1 conv + BN projection (the
paper's option B); the paper's CIFAR runs used zero-padded identities (option A),
which costs no parameters and changes the ResNet-110 count by under 1%.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class BottleneckBlock(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        mid = out_ch // self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        # Stride on the 3x3 conv: a strided 1x1 conv would skip three quarters of the input.
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, depth: int, block_type: str, initial_channels: int, in_channels: int, n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, block_type, family="resnet")
        block = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[block_type]
        self.conv = nn.Conv2d(in_channels, initial_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(initial_channels)
        stages, in_ch = [], initial_channels
        for i in range(3):
            # As the reference code: stage 1 keeps initial_channels outputs (16 -> 4 -> 16
            # bottlenecks; the paper's are 4x wider), later stages 2**i * 4 for bottlenecks.
            width = initial_channels * (block.expansion * 2**i if i else 1)
            units = []
            for j in range(n):
                units.append(block(in_ch, width, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(global_pool(x))


@register("resnet")
def resnet(*, depth=110, block_type="basic", initial_channels=16, in_channels=3, n_classes=10, n_blocks=None):
    # n_blocks is the reference's ImageNet-style option; CIFAR models are defined by depth.
    return ResNet(depth, block_type, initial_channels, in_channels, n_classes)
