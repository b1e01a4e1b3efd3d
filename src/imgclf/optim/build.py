"""``build_optimizer``: ``train.optimizer`` -> a ``torch.optim.Optimizer``.

torch's own SGD and Adam are used wherever they exist; only LARS is ours.
Their multi-tensor paths are asked for explicitly: ``fused=True`` when every
parameter is a floating-point CUDA tensor (one kernel per step), otherwise
``foreach=True``. So build the optimizer after ``model.to(device)``.

Weight decay is the classic L2 term added to the gradient (torch's
``weight_decay``, also for Adam, as the reference uses it), set per parameter
group by ``param_groups`` so ``no_weight_decay_on_bn`` applies to every optimizer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imgclf.config import Config
from imgclf.optim.lars import LARS
from imgclf.optim.param_groups import param_groups

OPTIMIZERS = ("sgd", "adam", "amsgrad", "lars")


def _multi_tensor_kwargs(groups: list[dict[str, Any]]) -> dict[str, bool]:
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    train = cfg.train
    name = train.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: unknown optimizer '{name}' (one of {', '.join(OPTIMIZERS)})")
    groups = param_groups(model, train.weight_decay, train.no_weight_decay_on_bn)
    lr = train.base_lr
    if name == "sgd":
        # torch refuses Nesterov without momentum; nesterov is then meaningless anyway
        return torch.optim.SGD(
            groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov and train.momentum > 0,
            weight_decay=train.weight_decay, **_multi_tensor_kwargs(groups),
        )
    if name in ("adam", "amsgrad"):
        betas = cfg.optim.adam.betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"optim.adam.betas: expected two values in [0, 1), got {betas}")
        return torch.optim.Adam(
            groups, lr=lr, betas=(betas[0], betas[1]), weight_decay=train.weight_decay,
            amsgrad=name == "amsgrad", **_multi_tensor_kwargs(groups),
        )
    lars = cfg.optim.lars
    return LARS(
        groups, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay,
        eps=lars.eps, threshold=lars.threshold,
    )
