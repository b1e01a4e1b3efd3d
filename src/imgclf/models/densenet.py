"""Densely Connected Convolutional Networks (Huang et al., 1608.06993; journal version 2001.02394).

CIFAR layout (paper Sec. 3-4): a 3x3 stem, three dense blocks joined by
transition layers (BN-ReLU-1x1 conv-2x2 avg pool), then BN-ReLU-global pool-linear.
- basic: each layer is BN-ReLU-3x3 conv producing k (growth_rate) maps;
  depth = 3n + 4; the stem has 2k maps as in the reference code (the paper: 16).
- bottleneck (DenseNet-B/BC): BN-ReLU-1x1 conv (4k)-BN-ReLU-3x3 conv (k);
  depth = 6n + 4; the stem has 2k maps.
Transitions keep floor(compression_rate * m) of their m input maps (theta in the
paper: 0.5 for -BC, 1 for plain DenseNet). Dropout follows every conv but the
stem's when drop_rate > 0, as the paper does without data augmentation.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class _Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training) if self.p > 0 else x


class BasicLayer(nn.Module):
    def __init__(self, in_ch: int, growth_rate: int, drop_rate: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, growth_rate, 3, padding=1, bias=False)
        self.drop = _Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.drop(self.conv(F.relu(self.bn(x))))], 1)


class BottleneckLayer(nn.Module):
    def __init__(self, in_ch: int, growth_rate: int, drop_rate: float):
        super().__init__()
        mid = 4 * growth_rate  # the paper's 4k bottleneck maps
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth_rate, 3, padding=1, bias=False)
        self.drop = _Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.conv1(F.relu(self.bn1(x))))
        y = self.drop(self.conv2(F.relu(self.bn2(y))))
        return torch.cat([x, y], 1)


class Transition(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, drop_rate: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.drop = _Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.drop(self.conv(F.relu(self.bn(x)))), 2)


class DenseNet(nn.Module):
    def __init__(self, depth: int, block_type: str, growth_rate: int, drop_rate: float, compression_rate: float,
                 in_channels: int, n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, block_type, family="densenet")
        if not 0.0 < compression_rate <= 1.0:
            raise ValueError(f"model.densenet.compression_rate: must be in (0, 1], got {compression_rate}")
        if growth_rate < 1:
            raise ValueError(f"model.densenet.growth_rate: must be >= 1, got {growth_rate}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"model.densenet.drop_rate: must be in [0, 1), got {drop_rate}")
        layer = {"basic": BasicLayer, "bottleneck": BottleneckLayer}[block_type]
        # 2k stem maps for both block types, as the reference code (the paper gives plain DenseNet 16).
        ch = 2 * growth_rate
        self.conv = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
        features: list[nn.Module] = []
        for b in range(3):
            for _ in range(n):
                features.append(layer(ch, growth_rate, drop_rate))
                ch += growth_rate
            if b < 2:
                out = int(compression_rate * ch)  # floor, as theta*m in the paper
                features.append(Transition(ch, out, drop_rate))
                ch = out
        self.features = nn.Sequential(*features)
        self.bn = nn.BatchNorm2d(ch)
        self.fc = nn.Linear(ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(self.conv(x))))
        return self.fc(global_pool(x))


@register("densenet")
def densenet(*, depth=100, block_type="bottleneck", growth_rate=12, drop_rate=0.0, compression_rate=0.5,
             in_channels=3, n_classes=10, n_blocks=None):
    # n_blocks is the reference's ImageNet-style option; CIFAR models are defined by depth.
    return DenseNet(depth, block_type, growth_rate, drop_rate, compression_rate, in_channels, n_classes)
