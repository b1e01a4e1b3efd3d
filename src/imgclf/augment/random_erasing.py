"""Random Erasing (Zhong et al., "Random Erasing Data Augmentation", 1708.04896).

Algorithm 1 of the paper as the reference implementation runs it, batched: every sample
draws all ``max_attempt`` candidate rectangles at once and keeps the first that fits, which
is the sequential retry loop's outcome without a per-sample Python loop. As in the
reference (and unlike the paper), a candidate's corner is drawn only once its size fits.

Reference details reproduced (tests/fidelity/test_augment.py compares the distributions):

* ``H_e = int(sqrt(S_e * r_e))``, ``W_e = int(sqrt(S_e / r_e))``: truncated, not rounded;
* a candidate fits when ``H_e < H`` and ``W_e < W`` (strictly);
* the corner is uniform over ``[0, H - H_e)`` x ``[0, W - W_e)`` (numpy's ``randint(0, H - H_e)``),
  so the rectangle never reaches the last row or column;
* the fill is ONE value ~ U(0, 1) per rectangle, the same for every pixel and channel, on the
  normalized image (the paper fills each pixel with a random value; the reference does not).
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
    # H_e = sqrt(S_e·r_e), W_e = sqrt(S_e/r_e), truncated to whole pixels (the reference's int())
    h = torch.sqrt(area * aspect).long()
    w = torch.sqrt(area / aspect).long()
    fits = (h < height) & (w < width)
    found = fits.any(dim=1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    # Given a size that fits, the corner is uniform over [0, H - H_e) x [0, W - W_e): one
    # position fewer than would keep it inside, as the reference's randint(0, H - H_e).
    u = torch.rand(2, n, generator=generator, device=device)
    top = (u[0] * (height - h)).long().clamp_max(height - h - 1).clamp_min(0)
    left = (u[1] * (width - w)).long().clamp_max(width - w - 1).clamp_min(0)
    return top, left, h, w, found


def random_erasing(x: Tensor, *, prob: float, area_ratio_range, min_aspect_ratio: float, max_attempt: int,
                   generator: torch.Generator, fill_low: float | Tensor = 0.0,
                   fill_high: float | Tensor = 1.0) -> Tensor:
    """Return a new batch in which each sample, with probability ``prob``, has one erased rectangle.

    ``x`` is (N, C, H, W) float, already normalized; it is not modified. Each sample
    gets its own rectangle, filled with one value ``fill_low + u * (fill_high - fill_low)``,
    u ~ U(0, 1) drawn per rectangle. The defaults U(0, 1) are what the reference writes into its
    normalized images; (C,) tensors of bounds map the same u per channel.
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
    low, high = (_fill_bound(b, x.dtype, device) for b in (fill_low, fill_high))
    u = torch.rand(n, 1, 1, 1, generator=generator, device=device, dtype=x.dtype)
    fill = u * (high - low) + low  # (N, C, 1, 1): one value per rectangle (and channel bound)
    return torch.where(mask[:, None], fill, x)


def _fill_bound(bound: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fill bound as a (1 | C, 1, 1) tensor on ``device``. A number is filled in on the device
    (the same value ``torch.tensor`` would round it to) rather than copied from the host at
    every step."""
    if isinstance(bound, Tensor):
        return bound.to(device=device, dtype=dtype).reshape(-1, 1, 1)
    return torch.full((1, 1, 1), bound, dtype=dtype, device=device)
