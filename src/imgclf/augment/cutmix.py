"""CutMix (Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers
with Localizable Features", 1905.04899).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .mixup import sample_beta


def cutmix(x: Tensor, y: Tensor, *, alpha: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Paste one box from a permutation of the batch into every image; returns new ``(x, y)``.

    ``x`` is (N, C, H, W) float, ``y`` soft targets (N, K) float. As in the paper's
    Algorithm A1, there is one λ ~ Beta(α, α) and one box per batch. The box has
    side r_w = W·sqrt(1-λ), r_h = H·sqrt(1-λ) (Eq. 2, so its area is the fraction
    1-λ of the image) and a uniform centre, and is clipped at the borders. λ is
    then recomputed as 1 - (clipped box area)/(H·W), so each target weight equals
    the fraction of pixels that come from each image. The box spans
    [c - r//2, c - r//2 + r) like a cutout square; Algorithm A1's c ± r//2 is one
    pixel shorter for odd r. Because λ is recomputed, the labels are exact either way.

    Deviation from the reference (CutMix label weight): the reference keeps the drawn λ
    as the label weight, which differs from the box's share of pixels when the box is
    clipped; here the weight is the share (the CutMix authors' code). No row uses CutMix.
    """
    n, _, height, width = x.shape
    device = x.device
    lam = sample_beta(alpha, alpha, (), generator=generator, device=device)
    perm = torch.randperm(n, generator=generator, device=device)
    cut = torch.sqrt(1.0 - lam)
    cut_h = (height * cut).long()
    cut_w = (width * cut).long()
    cy = torch.randint(0, height, (), generator=generator, device=device)
    cx = torch.randint(0, width, (), generator=generator, device=device)
    y1 = (cy - cut_h // 2).clamp(0, height)
    y2 = (cy - cut_h // 2 + cut_h).clamp(0, height)
    x1 = (cx - cut_w // 2).clamp(0, width)
    x2 = (cx - cut_w // 2 + cut_w).clamp(0, width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    box = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
    x_mixed = torch.where(box, x[perm], x)
    lam_exact = 1.0 - ((y2 - y1) * (x2 - x1)).to(y.dtype) / (height * width)
    y_mixed = torch.lerp(y[perm], y, lam_exact)
    return x_mixed, y_mixed
