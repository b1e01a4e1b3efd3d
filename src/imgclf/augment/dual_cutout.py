"""Dual-cutout (1802.07426): two independently cut-out views of each image.

The model sees both views in one forward pass; :func:`imgclf.losses.dual_cutout_loss`
adds the consistency term between their predictions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cutout import cutout


def dual_cutout_views(x: Tensor, *, mask_size: int, prob: float, cut_inside: bool, mask_color: float,
                      generator: torch.Generator) -> Tensor:
    """(2N, C, H, W): ``[view1; view2]``, view k = cutout of the whole batch with its own draws.

    Sample i's views are rows i and N + i. A new tensor; ``x`` is not modified.
    """
    return cutout(torch.cat([x, x]), mask_size=mask_size, prob=prob, cut_inside=cut_inside,
                  mask_color=mask_color, generator=generator)
