"""Model registry: each family module registers its builder under the reference README's name.

A builder takes its family's options as keyword arguments (the fields of
``config.model.<name>``) plus ``in_channels`` and ``n_classes``; :func:`create` then
initializes the weights with ``model.init_mode`` (the reference's initializer), or with the
family's own fixed mode where the reference fixes one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

from .common import initialize_weights

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_FIXED_INIT: dict[str, str] = {}


def register(name: str, init_mode: str | None = None):
    """``init_mode``: a mode this family always uses, whatever ``model.init_mode`` says."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model '{name}' registered twice")
        _BUILDERS[name] = fn
        if init_mode:
            _FIXED_INIT[name] = init_mode
        return fn

    return deco


def names() -> list[str]:
    return sorted(_BUILDERS)


def create(name: str, *, in_channels: int, n_classes: int, init_mode: str = "kaiming_fan_out",
           **options) -> nn.Module:
    if name not in _BUILDERS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(names())}")
    model = _BUILDERS[name](in_channels=in_channels, n_classes=n_classes, **options)
    initialize_weights(model, _FIXED_INIT.get(name, init_mode))
    return model


def build(cfg, in_channels: int, n_classes: int) -> nn.Module:
    """The model of a resolved :class:`imgclf.config.Config`."""
    options = dataclasses.asdict(getattr(cfg.model, cfg.model.name))
    return create(cfg.model.name, in_channels=in_channels, n_classes=n_classes, init_mode=cfg.model.init_mode,
                  **options)
