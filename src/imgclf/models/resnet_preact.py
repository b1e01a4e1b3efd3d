"""Pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks", 1603.05027).

Options from the reference README: ``preact_stage`` (whether the first unit of a
stage shares its BN-ReLU with the projection shortcut), ``remove_first_relu``
and ``add_last_bn`` (PyramidNet-style units, 1610.02915). Widths follow the reference
code: 16 / 32e / 64e for expansion e (1 basic, 4 bottleneck).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class _PreActUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, preact: bool, remove_first_relu: bool,
                 add_last_bn: bool):
        super().__init__()
        self.preact = preact  # True: shortcut sees the pre-activated input
        self.remove_first_relu = remove_first_relu
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.last_bn = nn.BatchNorm2d(out_ch) if add_last_bn else None
        self.shortcut = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            # A unit whose shortcut shares the pre-activation keeps its ReLU even with
            # remove_first_relu, as the reference code does (its residual_units rows ran so).
            x = F.relu(self.bn1(x))
            y = self.residual(x)
        else:
            y = self.bn1(x)
            y = self.residual(y if self.remove_first_relu else F.relu(y))
        if self.last_bn is not None:
            y = self.last_bn(y)
        return y + (x if self.shortcut is None else self.shortcut(x))


class BasicUnit(_PreActUnit):
    expansion = 1

    def __init__(self, in_ch, out_ch, stride, **kw):
        super().__init__(in_ch, out_ch, stride, **kw)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)

    def residual(self, x):
        return self.conv2(F.relu(self.bn2(self.conv1(x))))


class BottleneckUnit(_PreActUnit):
    expansion = 4

    def __init__(self, in_ch, out_ch, stride, **kw):
        super().__init__(in_ch, out_ch, stride, **kw)
        mid = out_ch // self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)

    def residual(self, x):
        x = self.conv1(x)
        x = self.conv2(F.relu(self.bn2(x)))
        return self.conv3(F.relu(self.bn3(x)))


class ResNetPreAct(nn.Module):
    def __init__(self, depth: int, block_type: str, initial_channels: int, preact_stage: list[bool],
                 remove_first_relu: bool, add_last_bn: bool, in_channels: int, n_classes: int,
                 unit_factory=None):
        super().__init__()
        n = blocks_per_stage(depth, block_type, family="resnet_preact")
        unit = unit_factory or {"basic": BasicUnit, "bottleneck": BottleneckUnit}[block_type]
        expansion = {"basic": 1, "bottleneck": 4}[block_type]
        if len(preact_stage) != 3:
            raise ValueError(f"model.resnet_preact.preact_stage: expected 3 booleans, got {preact_stage}")
        # As the reference code: stage 1 keeps initial_channels outputs, so a bottleneck unit
        # there is 16 -> 4 -> 16 (the paper's stage 1 outputs 4x that, 64 for ResNet-164).
        widths = [initial_channels] + [initial_channels * expansion * 2**i for i in (1, 2)]
        self.conv = nn.Conv2d(in_channels, initial_channels, 3, padding=1, bias=False)
        stages, in_ch = [], initial_channels
        for i, width in enumerate(widths):
            units = []
            for j in range(n):
                units.append(unit(in_ch, width, stride=2 if (i > 0 and j == 0) else 1,
                                  preact=preact_stage[i] if j == 0 else False,
                                  remove_first_relu=remove_first_relu, add_last_bn=add_last_bn))
                in_ch = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.conv(x))
        x = F.relu(self.bn(x))
        return self.fc(global_pool(x))


@register("resnet_preact")
def resnet_preact(*, depth=110, block_type="basic", initial_channels=16, preact_stage=(True, True, True),
                  remove_first_relu=False, add_last_bn=False, in_channels=3, n_classes=10, n_blocks=None):
    return ResNetPreAct(depth, block_type, initial_channels, list(preact_stage), remove_first_relu,
                        add_last_bn, in_channels, n_classes)
