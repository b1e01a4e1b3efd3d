"""The standard CIFAR augmentation as batched tensor ops: random crop with padding
(He et al. 2016: pad 4, random 32x32 crop) and horizontal flip, each sample with its own
offsets/coin from one generator; then per-channel normalization."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, *, padding: int, fill: float = 0.0, padding_mode: str = "constant",
                generator: torch.Generator) -> torch.Tensor:
    """Pad every image by ``padding`` then take a crop of the original size at a random offset."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    mode = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}[padding_mode]
    padded = F.pad(x, (padding,) * 4, mode=mode, value=fill) if mode == "constant" else F.pad(
        x, (padding,) * 4, mode=mode)
    oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def horizontal_flip(x: torch.Tensor, *, prob: float, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < prob
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8-range float -> (x/255 - mean) / std, with mean/std of shape (C,)."""
    scale = 1.0 / (255.0 * std)
    return x * scale[:, None, None] - (mean / std)[:, None, None]
