"""Optimizer parameter groups: which tensors get weight decay.

With ``train.no_weight_decay_on_bn`` on, the scale and shift of every
normalization layer and every bias are left undecayed; every other tensor
(conv and linear weights) keeps ``weight_decay``. These exempt tensors are a
small share of the parameters and set the scale and offset of activations
rather than the model's capacity, so decaying them mostly shrinks activations
instead of regularising. Goyal et al. (arXiv:1706.02677, sec. 5.1) leave the BN
coefficients undecayed and Jia et al. (arXiv:1807.11205) also leave biases
undecayed. The reference README's "no weight decay on BN" table measures the
effect at batch 4096.

The reference code's version of this switch decayed some of these tensors
anyway; here the switch does what its name says, and ``decayed_parameter_names``
lets a test pin the exact list.
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
            exempt = no_weight_decay_on_bn and (isinstance(module, _NORM_LAYERS) or name == "bias")
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
