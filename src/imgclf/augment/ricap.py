"""RICAP (Takahashi et al., "Data Augmentation using Random Image Cropping and
Patching for Deep CNNs", 1811.09030).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .mixup import sample_beta


OFFSETS = ("per_batch", "per_sample")


def ricap(x: Tensor, y: Tensor, *, beta: float, generator: torch.Generator,
          offsets: str = "per_batch") -> tuple[Tensor, Tensor]:
    """Patch four crops from four permutations of the batch into each image; returns new ``(x, y)``.

    ``x`` is (N, C, H, W) float, ``y`` soft targets (N, K) float. The boundary
    position (w, h) = (round(W·u), round(H·v)), u, v ~ Beta(β, β), is drawn once per
    batch, as in the paper. Region k (top-left, top-right, bottom-left, bottom-right) has
    size (w_k, h_k) and is filled from image perm_k(i), cropped at an offset that is
    uniform over the positions that keep the crop inside the source image. Targets
    are Σ_k (w_k·h_k / (W·H)) y_perm_k(i), the paper's area-weighted label mix.

    ``offsets`` (``augmentation.ricap.offsets``): ``per_batch`` draws one offset per
    region for the whole batch, as the RICAP authors' code and the reference's collator
    do (what the table rows run); ``per_sample`` draws one per sample and region: each
    sample's offset has the same distribution, the batch sees more distinct crops, and
    the label weights are unchanged.
    """
    if offsets not in OFFSETS:
        raise ValueError(f"augmentation.ricap.offsets: unknown value {offsets!r} (per_batch | per_sample)")
    n, _, height, width = x.shape
    device = x.device
    uv = sample_beta(beta, beta, (2,), generator=generator, device=device)
    w = (width * uv[0]).round().long()
    h = (height * uv[1]).round().long()
    # Regions in order k = 2·(bottom) + (right); sizes along each axis.
    ws = torch.stack([w, width - w, w, width - w])
    hs = torch.stack([h, h, height - h, height - h])
    perms = torch.stack([torch.randperm(n, generator=generator, device=device) for _ in range(4)])  # (4, N)
    u = torch.rand(2, 4, n if offsets == "per_sample" else 1, generator=generator, device=device)
    off_y = (u[0] * (height - hs + 1)[:, None]).long().clamp_max((height - hs)[:, None])  # (4, N), or (4, 1) per batch
    off_x = (u[1] * (width - ws + 1)[:, None]).long().clamp_max((width - ws)[:, None])

    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    bottom = (rows >= h).long()  # (H,)
    right = (cols >= w).long()  # (W,)
    region = 2 * bottom[:, None] + right[None, :]  # (H, W)
    # Output pixel (r, s) of region k is pixel (r - top_k, s - left_k) of its crop,
    # i.e. flat source pixel crop_start_k(i) + (r - top_k)·W + (s - left_k).
    within = (rows - bottom * h)[:, None] * width + (cols - right * w)[None, :]  # (H, W)
    crop_start = (perms * height + off_y) * width + off_x  # (4, N), flat over (N, H, W)
    source = crop_start.T[:, region] + within  # (N, H, W)
    # One row gather over (N·H·W, C) pixels; free of copies when x is channels_last.
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    x_patched = pixels.index_select(0, source.view(-1)).view(n, height, width, -1).permute(0, 3, 1, 2)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x_patched = x_patched.contiguous()

    weights = (ws * hs).to(y.dtype) / (height * width)  # (4,)
    y_patched = torch.einsum("k,knc->nc", weights, y[perms])
    return x_patched, y_patched
