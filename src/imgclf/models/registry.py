"""Model registry: each family module registers its builder under the reference README's name.

A builder takes its family's options as keyword arguments (the fields of
``config.model.<name>``) plus ``in_channels`` and ``n_classes``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model '{name}' registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def names() -> list[str]:
    return sorted(_BUILDERS)


def create(name: str, *, in_channels: int, n_classes: int, **options) -> nn.Module:
    if name not in _BUILDERS:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(names())}")
    return _BUILDERS[name](in_channels=in_channels, n_classes=n_classes, **options)


def build(cfg, in_channels: int, n_classes: int) -> nn.Module:
    """The model of a resolved :class:`imgclf.config.Config`."""
    options = dataclasses.asdict(getattr(cfg.model, cfg.model.name))
    return create(cfg.model.name, in_channels=in_channels, n_classes=n_classes, **options)
