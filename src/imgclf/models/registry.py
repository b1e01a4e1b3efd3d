"""Model registry: each family module registers its builder under the reference README's name.

The families are the catalog's (:data:`imgclf.catalog.MODELS`): an entry names the module that
registers its builder, which is imported when the family is first built. A builder takes its
family's options as keyword arguments (the fields of ``config.model.<name>``) plus
``in_channels`` and ``n_classes``; :func:`create` then initializes the weights with
``model.init_mode`` (the reference's initializer), or with the catalog entry's fixed mode where
the reference fixes one.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch.nn as nn

from imgclf import catalog

from .common import initialize_weights

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model '{name}' registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def names() -> list[str]:
    return list(catalog.model_names())


def create(name: str, *, in_channels: int, n_classes: int, init_mode: str = "kaiming_fan_out",
           **options) -> nn.Module:
    family = catalog.MODELS.get(name)
    if family is None:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(names())}")
    if name not in _BUILDERS:
        importlib.import_module(family.module)
    if name not in _BUILDERS:
        raise KeyError(f"model '{name}': its module {family.module} registers no builder of that name")
    model = _BUILDERS[name](in_channels=in_channels, n_classes=n_classes, **options)
    initialize_weights(model, family.init_mode or init_mode)
    return model


def build(cfg, in_channels: int, n_classes: int) -> nn.Module:
    """The model of a resolved :class:`imgclf.config.Config`."""
    options = dataclasses.asdict(getattr(cfg.model, cfg.model.name))
    return create(cfg.model.name, in_channels=in_channels, n_classes=n_classes, init_mode=cfg.model.init_mode,
                  **options)
