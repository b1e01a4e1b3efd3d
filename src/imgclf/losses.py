"""Losses on soft targets.

Mixup, CutMix, RICAP and label smoothing all produce a target distribution per
sample, so one soft-target cross-entropy serves all four. Dual-cutout adds a
consistency term between the two views' logits.

Deviation from the reference (Label smoothing with a mixer): the reference's loss
keeps only the first of mixup > RICAP > CutMix > label smoothing > Dual-Cutout;
here label smoothing composes with a mixer (the smoothed targets are mixed) and with
Dual-Cutout. No table row combines two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot(labels: Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N,) integer labels -> (N, K) one-hot targets of ``dtype``."""
    return F.one_hot(labels.long(), n_classes).to(dtype)


def smooth_targets(labels: Tensor, n_classes: int, epsilon: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Label smoothing (Szegedy et al., 1512.00567, Sec. 7): (1-ε)·onehot + ε/K.

    The ε/K is spread over all K classes, the true class included, so each row sums to 1.
    """
    return one_hot(labels, n_classes, dtype) * (1.0 - epsilon) + epsilon / n_classes


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Mean over the batch of -Σ_k t_k log softmax(z)_k.

    With one-hot targets this is the usual cross-entropy. With mixed targets it
    equals λ·CE(y_a) + (1-λ)·CE(y_b), the mixup/CutMix/RICAP objectives, because
    the cross-entropy is linear in the targets.
    """
    # Computed in float32: under fp16 autocast the logits may be half, whose
    # log-softmax loses the small probabilities that the soft targets weight.
    return F.cross_entropy(logits.float(), soft_targets.float())


def dual_cutout_loss(logits_2n: Tensor, soft_targets: Tensor, alpha: float) -> Tensor:
    """Dual-cutout (1802.07426) loss on the (2N, K) logits of ``[view1; view2]``.

    ½·(CE(z1, t) + CE(z2, t)) + α·mean((z1 - z2)²). The squared difference is
    averaged over all N·K logit entries (``F.mse_loss``'s mean reduction, as the
    reference does), not summed over classes, so α's scale does not depend on K.
    """
    z1, z2 = logits_2n.float().chunk(2)
    ce = 0.5 * (soft_cross_entropy(z1, soft_targets) + soft_cross_entropy(z2, soft_targets))
    return ce + alpha * F.mse_loss(z1, z2, reduction="mean")


def dual_cutout_predict(logits_2n: Tensor) -> Tensor:
    """(N, K) prediction from the (2N, K) logits of two views: their mean."""
    z1, z2 = logits_2n.chunk(2)
    return 0.5 * (z1 + z2)
