"""Optimizer parameter groups: which tensors get weight decay.

With ``train.no_weight_decay_on_bn`` on, the scale and shift of every
normalization layer are left undecayed; every other tensor (conv and linear
weights, and their biases) keeps ``weight_decay``. The BN coefficients set the
scale and offset of activations rather than the model's capacity, so decaying
them mostly shrinks activations instead of regularising (Goyal et al.,
arXiv:1706.02677, sec. 5.1).

Deviation from the reference (No weight decay on BN): this is the rule that
produced the reference README's "no weight decay on BN" table: those runs
(January 2019) used the reference's train.py of that time,
which left out of weight decay exactly the parameters whose name contains
``bn`` (all BN layers of its models, the FC bias decayed). The later rewrite of
that code (commit 993089a, the oracle in ``../shared/reference``) decays only
names containing ``conv.weight``: in ResNet-PreAct that is the stem and the two
shortcut convolutions, so almost no weight decay at all. No published number
was made with it, so it is not reproduced. ``decayed_parameter_names`` lets a
test pin the exact list.
"""
from __future__ import annotations

from typing import Any

from torch import nn

# BatchNorm (incl. SyncBatchNorm) and InstanceNorm derive from _NormBase;
# GroupNorm and LayerNorm play the same scale-and-shift role.
_NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


Named = list[tuple[str, nn.Parameter]]


def _split(model: nn.Module, no_weight_decay_on_bn: bool) -> tuple[Named, Named]:
    """(decayed, undecayed) as (qualified name, parameter), in module order."""
    decayed: Named = []
    undecayed: Named = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue  # frozen, or shared and already placed by its first owner
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            exempt = no_weight_decay_on_bn and isinstance(module, _NORM_LAYERS)
            (undecayed if exempt else decayed).append((full, p))
    return decayed, undecayed


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay_on_bn: bool) -> list[dict[str, Any]]:
    """Groups for ``torch.optim`` constructors; each carries its own ``weight_decay``.

    Empty groups are dropped (with the switch off there is one group).
    """
    decayed, undecayed = _split(model, no_weight_decay_on_bn)
    groups = [
        {"params": [p for _, p in decayed], "weight_decay": weight_decay},
        {"params": [p for _, p in undecayed], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


def decayed_parameter_names(model: nn.Module, no_weight_decay_on_bn: bool = True) -> list[str]:
    """Qualified names of the parameters that get weight decay, in module order."""
    return [name for name, _ in _split(model, no_weight_decay_on_bn)[0]]
