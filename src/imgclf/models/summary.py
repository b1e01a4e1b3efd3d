"""Parameter and multiply-accumulate counts of a model, measured on one forward pass.

MACs count Conv2d and Linear only (the convention of the papers' FLOP figures):
BN, activations, pooling and additions are comparatively free.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return out.numel() * (m.in_channels // m.groups) * kh * kw


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def summarize(model: nn.Module, input_shape: Sequence[int]) -> dict:
    """``input_shape`` is (C, H, W) or (1, C, H, W); returns params, macs (batch of one) and the output shape."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"input_shape: expected (C, H, W) or (1, C, H, W), got {tuple(input_shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    macs = 0

    def hook(m, _inputs, out):
        nonlocal macs
        macs += _conv_macs(m, out) if isinstance(m, nn.Conv2d) else _linear_macs(m, out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    # Eval mode: BN cannot normalize a batch of one at 1x1 resolution in training mode, and
    # stochastic layers (dropout, shake-shake) must not change the count.
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": int(macs),
        "output_shape": list(out.shape),
    }
