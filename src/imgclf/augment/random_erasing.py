"""Random Erasing (Zhong et al., "Random Erasing Data Augmentation", 1708.04896).

Algorithm 1 of the paper, batched: every sample draws all ``max_attempt``
candidate rectangles at once and keeps the first that fits, which is the
sequential retry loop's outcome without a per-sample Python loop.

As in the authors' code, a candidate is accepted when its size fits the image
and its corner is then drawn uniformly among the positions that keep it inside.
Alg. 1 draws the corner as part of each attempt instead, which makes larger
rectangles slightly less likely. Given the size, the corner's distribution is
the same either way.
"""
from __future__ import annotations

import torch
from torch import Tensor


def erasing_boxes(n: int, height: int, width: int, *, area_ratio_range: tuple[float, float],
                  min_aspect_ratio: float, max_attempt: int, generator: torch.Generator,
                  device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-sample rectangles ``(top, left, h, w, found)``, each (N,) on ``device``.

    ``found`` is False where none of the ``max_attempt`` candidates fitted; the
    paper then leaves the image unchanged.
    """
    lo, hi = area_ratio_range
    shape = (n, max_attempt)
    # S_e ~ U(s_l, s_h)·S and r_e ~ U(r_1, 1/r_1), uniform in r as in Alg. 1 (not log-uniform).
    area = torch.empty(shape, device=device).uniform_(lo, hi, generator=generator) * (height * width)
    aspect = torch.empty(shape, device=device).uniform_(min_aspect_ratio, 1.0 / min_aspect_ratio,
                                                        generator=generator)
    # H_e = sqrt(S_e·r_e), W_e = sqrt(S_e/r_e), rounded to whole pixels as the authors' code does.
    h = torch.sqrt(area * aspect).round().long()
    w = torch.sqrt(area / aspect).round().long()
    fits = (h <= height) & (w <= width)
    found = fits.any(dim=1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    # Given a size that fits, the corner is uniform over every position keeping the
    # rectangle inside (Alg. 1's x_e + W_e <= W, y_e + H_e <= H).
    u = torch.rand(2, n, generator=generator, device=device)
    top = (u[0] * (height - h + 1)).long().clamp_max(height - h)
    left = (u[1] * (width - w + 1)).long().clamp_max(width - w)
    return top, left, h, w, found


def random_erasing(x: Tensor, *, prob: float, area_ratio_range, min_aspect_ratio: float, max_attempt: int,
                   generator: torch.Generator, fill_low: float | Tensor = 0.0,
                   fill_high: float | Tensor = 1.0) -> Tensor:
    """Return a new batch in which each sample, with probability ``prob``, has one rectangle of noise.

    ``x`` is (N, C, H, W) float, already normalized; it is not modified. Each sample
    gets its own rectangle. The erased pixels are i.i.d. U(fill_low, fill_high) per
    pixel and channel. The defaults U(0, 1) are what the reference applies to its
    normalized images; the paper fills with random pixel values, i.e.
    U((0 - mean)/std, (1 - mean)/std) per channel after normalization. To get that,
    pass those bounds as (C,) tensors.
    """
    n, c, height, width = x.shape
    device = x.device
    applied = torch.rand(n, generator=generator, device=device) < prob
    top, left, h, w, found = erasing_boxes(
        n, height, width, area_ratio_range=tuple(area_ratio_range), min_aspect_ratio=min_aspect_ratio,
        max_attempt=max_attempt, generator=generator, device=device)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :] & (applied & found)[:, None, None]
    low = torch.as_tensor(fill_low, dtype=x.dtype, device=device).reshape(-1, 1, 1)
    high = torch.as_tensor(fill_high, dtype=x.dtype, device=device).reshape(-1, 1, 1)
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype) * (high - low) + low
    return torch.where(mask[:, None], noise, x)
