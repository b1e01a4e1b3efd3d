"""Pre-activation ResNet with squeeze-and-excitation (Hu et al., "Squeeze-and-Excitation Networks",
1709.01507) on the units of :mod:`imgclf.models.resnet_preact`.

SE recalibrates the residual branch's channels before the addition (the paper's
SE-ResNet module, Fig. 3), so the identity path stays untouched.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register
from .resnet_preact import BasicUnit, BottleneckUnit, ResNetPreAct


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        # At least one hidden unit: narrow test configurations have fewer channels than the reduction.
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = global_pool(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s[:, :, None, None].to(x.dtype)


class _SEMixin:
    """Owns the unit's optional last BN so that SE comes after it (the base unit applies its
    last BN after ``residual``, which would put the BN behind the recalibration)."""

    def __init__(self, in_ch, out_ch, stride, *, se_reduction: int, add_last_bn: bool, **kw):
        super().__init__(in_ch, out_ch, stride, add_last_bn=False, **kw)
        self.branch_bn = nn.BatchNorm2d(out_ch) if add_last_bn else nn.Identity()
        self.se = SqueezeExcitation(out_ch, se_reduction)

    def residual(self, x):
        return self.se(self.branch_bn(super().residual(x)))


class SEBasicUnit(_SEMixin, BasicUnit):
    pass


class SEBottleneckUnit(_SEMixin, BottleneckUnit):
    pass


# Initialized fan_out whatever model.init_mode says: the catalog entry's init_mode.
@register("se_resnet_preact")
def se_resnet_preact(*, depth=110, block_type="basic", initial_channels=16, se_reduction=16,
                     preact_stage=(True, True, True), remove_first_relu=False, add_last_bn=False,
                     in_channels=3, n_classes=10):
    # Checked here so that the message names this family's keys, not resnet_preact's.
    blocks_per_stage(depth, block_type, family="se_resnet_preact")
    if se_reduction < 1:
        raise ValueError(f"model.se_resnet_preact.se_reduction: must be >= 1, got {se_reduction}")
    unit = {"basic": SEBasicUnit, "bottleneck": SEBottleneckUnit}[block_type]
    return ResNetPreAct(depth, block_type, initial_channels, list(preact_stage), remove_first_relu,
                        add_last_bn, in_channels, n_classes,
                        unit_factory=functools.partial(unit, se_reduction=se_reduction))
