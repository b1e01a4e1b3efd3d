"""Deep Pyramidal Residual Networks (Han et al., 1610.02915).

Additive widening (paper Eq. 2): unit k of N = 3n has round(16 + k * alpha / N) (the reference
code rounds, the paper floors)
residual-branch channels (4x that at a bottleneck unit's output), so the width
grows by alpha / N per unit instead of doubling per stage.
Units (paper Fig. 6(d)): no ReLU at the start, BN at the end of the branch;
basic: BN-conv3x3-BN-ReLU-conv3x3-BN, bottleneck: BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN.
Shortcuts are parameter-free (Sec. 3.2 / Fig. 5(b)): identity zero-padded to the
new width, and 2x2 average pooling where the unit downsamples.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class _PyramidUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.out_ch = out_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            # ceil_mode keeps the shortcut's size equal to the strided conv's on odd inputs.
            x = F.avg_pool2d(x, 2, ceil_mode=True)
        pad = self.out_ch - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class BasicUnit(_PyramidUnit):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def residual(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y)))
        return self.bn3(y)


class BottleneckUnit(_PyramidUnit):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__(in_ch, width * self.expansion, stride)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(width * self.expansion)

    def residual(self, x):
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        return self.bn4(y)


class PyramidNet(nn.Module):
    def __init__(self, depth: int, block_type: str, alpha: float, initial_channels: int, in_channels: int,
                 n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, block_type, family="pyramidnet")
        if alpha < 0:
            raise ValueError(f"model.pyramidnet.alpha: must be >= 0, got {alpha}")
        unit = {"basic": BasicUnit, "bottleneck": BottleneckUnit}[block_type]
        self.conv = nn.Conv2d(in_channels, initial_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(initial_channels)
        n_units = 3 * n
        units, in_ch = [], initial_channels
        for k in range(1, n_units + 1):
            # Rounded to nearest as the reference code (the paper's Eq. 2 floors).
            width = round(initial_channels + k * alpha / n_units)
            stride = 2 if k in (n + 1, 2 * n + 1) else 1
            units.append(unit(in_ch, width, stride))
            in_ch = width * unit.expansion
        self.units = nn.Sequential(*units)
        self.bn_out = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.bn(self.conv(x)))
        x = F.relu(self.bn_out(x))
        return self.fc(global_pool(x))


@register("pyramidnet")
def pyramidnet(*, depth=272, block_type="bottleneck", alpha=200, initial_channels=16, in_channels=3,
               n_classes=10, n_blocks=None):
    # n_blocks is the reference's ImageNet-style option; CIFAR models are defined by depth.
    return PyramidNet(depth, block_type, alpha, initial_channels, in_channels, n_classes)
