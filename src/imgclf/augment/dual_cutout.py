"""Dual-cutout (1802.07426): two independently cut-out views of each image.

The model sees each view in a forward pass of its own (:class:`PerViewForward`), as the
reference does, so BatchNorm normalises every view over N samples, not over both views'
2N; :func:`imgclf.losses.dual_cutout_loss` adds the consistency term between their predictions.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .cutout import cutout


def dual_cutout_views(x: Tensor, *, mask_size: int, prob: float, cut_inside: bool, mask_color: float,
                      generator: torch.Generator) -> Tensor:
    """(2N, C, H, W): ``[view1; view2]``, view k = cutout of the whole batch with its own draws.

    Sample i's views are rows i and N + i. A new tensor; ``x`` is not modified.
    """
    return cutout(torch.cat([x, x]), mask_size=mask_size, prob=prob, cut_inside=cut_inside,
                  mask_color=mask_color, generator=generator)


class PerViewForward(nn.Module):
    """Runs ``model`` on each half of a ``[view1; view2]`` batch separately; (2N, K) logits.

    A wrapper rather than two calls in the engine, so a DDP-wrapped model still sees one
    forward per backward. It holds no parameters of its own; ``model``'s state_dict is unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.model(view) for view in x.chunk(2)])


def per_view_model(model: nn.Module, use_dual_cutout: bool) -> nn.Module:
    """What the engine calls for a training forward pass: ``model``, or with dual-cutout its
    :class:`PerViewForward`."""
    return PerViewForward(model) if use_dual_cutout else model
