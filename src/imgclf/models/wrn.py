"""Wide Residual Networks (Zagoruyko & Komodakis, 1605.07146).

WRN-d-k: three groups of pre-activation basic blocks B(3,3) with 16k/32k/64k
channels, n = (d - 4) / 6 blocks per group (the 4 counts the stem, the two
projection shortcuts' 1x1 convs and the classifier), dropout between the two
convs of a block. The recipe initializes with kaiming_fan_in, as the reference's
config did (the authors' code uses fan_out).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class WideBasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, drop_rate: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        y = self.conv1(a)
        if self.drop_rate > 0:
            # Before bn2, as the reference code (the authors' code drops after the ReLU).
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y)))
        # The projection shares the block's BN-ReLU, as in the authors' code.
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widening_factor: int, initial_channels: int, drop_rate: float,
                 in_channels: int, n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, "", family="wrn")
        if widening_factor < 1:
            raise ValueError(f"model.wrn.widening_factor: must be >= 1, got {widening_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"model.wrn.drop_rate: must be in [0, 1), got {drop_rate}")
        self.conv = nn.Conv2d(in_channels, initial_channels, 3, padding=1, bias=False)
        groups, in_ch = [], initial_channels
        for i in range(3):
            width = initial_channels * widening_factor * 2**i
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_ch, width, 2 if (i > 0 and j == 0) else 1, drop_rate))
                in_ch = width
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.groups(self.conv(x))))
        return self.fc(global_pool(x))


@register("wrn")
def wrn(*, depth=28, widening_factor=10, initial_channels=16, drop_rate=0.0, in_channels=3, n_classes=10):
    return WideResNet(depth, widening_factor, initial_channels, drop_rate, in_channels, n_classes)
