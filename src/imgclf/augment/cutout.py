"""Cutout (DeVries & Taylor, "Improved Regularization of CNNs with Cutout", 1708.04552).

Batched: one square per sample, drawn with per-sample randomness from an explicit
generator, applied as a single masked fill.
"""
from __future__ import annotations

import torch
from torch import Tensor


def square_mask(n: int, height: int, width: int, *, mask_size: int, cut_inside: bool,
                generator: torch.Generator, device: torch.device | str) -> Tensor:
    """(N, H, W) bool: one mask_size x mask_size square per sample (clipped at borders).

    The square spans rows [c - size//2, c - size//2 + size) around its centre c, as
    the paper's code does for even sizes (odd sizes keep the full ``size`` rows
    rather than the paper code's size - 1). cut_inside=False: c is uniform over
    [0, H - 1 + (size even)]; the extra position for even sizes makes the clipped
    coverage symmetric (a square can overhang the top by size/2 rows exactly as
    often as the bottom), which is what the reference does. cut_inside=True: the
    top-left corner is uniform over every position that keeps the square inside.
    """
    half = mask_size // 2
    even = int(mask_size % 2 == 0)

    def starts(extent: int) -> Tensor:
        if cut_inside:
            return torch.randint(0, max(extent - mask_size, 0) + 1, (n,), generator=generator, device=device)
        centre = torch.randint(0, extent + even, (n,), generator=generator, device=device)
        return centre - half

    top, left = starts(height), starts(width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + mask_size)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + mask_size)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(x: Tensor, *, mask_size: int, prob: float, cut_inside: bool, mask_color: float,
           generator: torch.Generator) -> Tensor:
    """Return a new batch in which each sample, with probability ``prob``, has one square set to ``mask_color``.

    ``x`` is (N, C, H, W) float, already normalized, so ``mask_color=0`` is the
    dataset mean, as in the authors' code (Cutout runs after Normalize there).
    ``x`` itself is not modified.
    """
    n, _, height, width = x.shape
    applied = torch.rand(n, generator=generator, device=x.device) < prob
    mask = square_mask(n, height, width, mask_size=mask_size, cut_inside=cut_inside,
                       generator=generator, device=x.device)
    mask &= applied[:, None, None]
    return x.masked_fill(mask[:, None], mask_color)
