"""Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", 1710.09412).

Also home of :func:`sample_beta`, the generator-driven Beta draw that CutMix and
RICAP share: ``torch.distributions.Beta`` takes no generator, so its draws would
not be a function of the run's seeded state.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sample_beta(a: float, b: float, shape: tuple[int, ...], *, generator: torch.Generator,
                device: torch.device | str | None = None) -> Tensor:
    """Beta(a, b) draws (float64, on ``device``), a pure function of ``generator``'s state.

    Uses X/(X+Y) with X ~ Gamma(a), Y ~ Gamma(b), the standard Beta construction.
    ``torch._standard_gamma`` is the one Gamma sampler in torch that accepts a
    generator (``torch.distributions.Gamma`` calls it without one). The draw stays
    on the device, so no host sync is needed; so are its shape parameters: ``torch.full``
    fills them on the device, where ``torch.tensor([a, b], device=...)`` would copy a host
    buffer to the GPU at every step.
    """
    device = generator.device if device is None else device
    alphas = torch.stack([torch.full(shape, a, dtype=torch.float64, device=device),
                          torch.full(shape, b, dtype=torch.float64, device=device)], dim=-1)
    g = torch._standard_gamma(alphas, generator=generator)
    x, y = g.unbind(-1)
    total = x + y
    # Both Gammas underflow to 0 only for tiny shape parameters (< ~1e-11 at 0.3);
    # the Beta is then symmetric about 1/2, so 1/2 is the least-biased stand-in.
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(torch.float64).tiny), 0.5)


def mixup(x: Tensor, y: Tensor, *, alpha: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mix a batch with a permutation of itself; returns new ``(x, y)``.

    ``x`` is (N, C, H, W) float, ``y`` soft targets (N, K) float. One λ ~ Beta(α, α)
    per batch, as in the paper and the reference implementation: the
    pair (x_i, x_perm(i)) is mixed as λ x_i + (1-λ) x_perm(i), and the targets the
    same way, so one soft-target cross-entropy equals the paper's
    λ CE(y_i) + (1-λ) CE(y_perm(i)).
    """
    lam = sample_beta(alpha, alpha, (), generator=generator, device=x.device)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    x_mixed = torch.lerp(x[perm], x, lam.to(x.dtype))
    y_mixed = torch.lerp(y[perm], y, lam.to(y.dtype))
    return x_mixed, y_mixed
