"""Pieces shared by the model families."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgclf import catalog


INIT_MODES = ("kaiming_fan_out", "kaiming_fan_in")


def initialize_weights(model: nn.Module, init_mode: str = "kaiming_fan_out") -> None:
    """The reference's initializer (``model.init_mode``): He et al. normal init with the given
    fan for every conv AND fully connected weight, BN weight 1 / bias 0, zero linear biases.
    Conv biases (VGG's) keep PyTorch's default, as the reference leaves them."""
    if init_mode not in INIT_MODES:
        raise ValueError(f"model.init_mode: '{init_mode}' is not one of {', '.join(INIT_MODES)}")
    mode = init_mode[len("kaiming_"):]
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def blocks_per_stage(depth: int, block_type: str, family: str) -> int:
    """n of the family's depth rule, depth = a * n + b (its catalog entry's, which resolution
    checks too): the units per stage of the CIFAR-style networks."""
    rules = catalog.MODELS[family].depth_rules
    a, b = rules.get(block_type) or rules[""]
    n, rem = divmod(depth - b, a)
    if rem or n < 1:
        valid = ", ".join(str(a * k + b) for k in (1, 2, 3, 9, 18))
        fit = f"does not fit block_type '{block_type}' (need depth = {a}n + {b}, " if block_type else \
            f"is not {a}n+{b} ("
        raise ValueError(f"model.{family}.depth: {depth} {fit}e.g. {valid})")
    return n


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): global average pooling, so 28x28 and 32x32 inputs share one head."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
