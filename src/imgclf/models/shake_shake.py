"""Shake-Shake regularization (Gastaldi, 1705.07485), on the paper's 26-layer CIFAR network.

Each block sums two residual branches (ReLU-conv3x3-BN-ReLU-conv3x3-BN) with a
random convex combination: alpha * b1 + (1 - alpha) * b2 in the forward pass,
while the backward pass weighs the gradients by an independent beta. The switches
follow the paper's names: forward "Shake" (alpha ~ U(0,1)) or "Even" (0.5);
backward "Shake" (fresh beta ~ U(0,1)) or "Even" (0.5; the reference code has no
"Keep", beta = alpha, so shake_backward false is Even); level "Image"
(one coefficient per image) or "Batch". S-S-I = shake_forward, shake_backward,
shake_image. At test time both branches get the expectation, 0.5.
Widths: a 16-map stem, then stages of k/2k/4k maps ("2 x kd"), depth = 6n + 2.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import blocks_per_stage, global_pool
from .registry import register


class ShakeFunction(torch.autograd.Function):
    """alpha * x1 + (1 - alpha) * x2 forward; gradients beta * g and (1 - beta) * g backward.

    A plain expression would route alpha into the backward pass too; the paper's
    "Shake-Shake" needs beta drawn independently, hence a custom Function."""

    @staticmethod
    def forward(ctx, x1, x2, alpha, beta):
        ctx.save_for_backward(beta)
        alpha = alpha.to(x1.dtype)
        return alpha * x1 + (1 - alpha) * x2

    @staticmethod
    def backward(ctx, grad):
        (beta,) = ctx.saved_tensors
        beta = beta.to(grad.dtype)
        return beta * grad, (1 - beta) * grad, None, None


def shake(x1: torch.Tensor, x2: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return ShakeFunction.apply(x1, x2, alpha, beta)


def shake_coefficients(batch: int, shake_forward: bool, shake_backward: bool, shake_image: bool,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) broadcastable to (N, C, H, W) for training."""
    shape = (batch, 1, 1, 1) if shake_image else (1, 1, 1, 1)
    alpha = torch.rand(shape, device=device) if shake_forward else torch.full(shape, 0.5, device=device)
    beta = torch.rand(shape, device=device) if shake_backward else torch.full(shape, 0.5, device=device)
    return alpha, beta


class ResidualBranch(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__(
            # Not in-place: the block's input also feeds the other branch and the shortcut.
            nn.ReLU(inplace=False),
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )


class ShiftedSkip(nn.Module):
    """The paper's shortcut where the shape changes (Sec. 2.1): two strided 1x1 convs, one
    on the input and one on the input shifted by one pixel, concatenated, then BN. The
    shift makes the second conv see the pixels the first one's stride skips."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_ch, out_ch // 2, 1, bias=False)
        self.conv2 = nn.Conv2d(in_ch, out_ch - out_ch // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        s = self.stride
        y1 = self.conv1(x[:, :, ::s, ::s])
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        y2 = self.conv2(shifted[:, :, ::s, ::s])
        return self.bn(torch.cat([y1, y2], 1))


class ShakeBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, shake_forward: bool, shake_backward: bool,
                 shake_image: bool):
        super().__init__()
        self.branch1 = ResidualBranch(in_ch, out_ch, stride)
        self.branch2 = ResidualBranch(in_ch, out_ch, stride)
        self.skip = ShiftedSkip(in_ch, out_ch, stride) if stride != 1 or in_ch != out_ch else None
        self.switches = (shake_forward, shake_backward, shake_image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.branch1(x), self.branch2(x)
        if self.training:
            alpha, beta = shake_coefficients(x.shape[0], *self.switches, device=x.device)
            y = shake(b1, b2, alpha, beta)
        else:
            y = 0.5 * (b1 + b2)  # E[alpha] = 0.5
        return y + (x if self.skip is None else self.skip(x))


class ShakeShake(nn.Module):
    def __init__(self, depth: int, initial_channels: int, shake_forward: bool, shake_backward: bool,
                 shake_image: bool, in_channels: int, n_classes: int):
        super().__init__()
        n = blocks_per_stage(depth, "basic", family="shake_shake")
        if initial_channels < 1:
            raise ValueError(f"model.shake_shake.initial_channels: must be >= 1, got {initial_channels}")
        stem = 16  # fixed in the paper's network, independent of the width k
        self.conv = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(stem)
        stages, in_ch = [], stem
        for i in range(3):
            width = initial_channels * 2**i
            blocks = []
            for j in range(n):
                blocks.append(ShakeBlock(in_ch, width, 2 if (i > 0 and j == 0) else 1, shake_forward,
                                         shake_backward, shake_image))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stages(self.bn(self.conv(x))))
        return self.fc(global_pool(x))


@register("shake_shake")
def shake_shake(*, depth=26, initial_channels=96, shake_forward=True, shake_backward=True, shake_image=True,
                in_channels=3, n_classes=10):
    return ShakeShake(depth, initial_channels, shake_forward, shake_backward, shake_image, in_channels,
                      n_classes)
