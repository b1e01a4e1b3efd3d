"""Losses: on identical logits and targets, our soft-target losses equal the reference's
``create_loss`` for label smoothing, mixup, CutMix, RICAP and Dual-Cutout, with the parameters the
table rows use, and the combinations the rows use (none: each row uses at most one of them).
"""
from __future__ import annotations

import pytest
import torch

from imgclf import losses
from imgclf.tables import spec as S
from oracle import RECIPES, REPO, augmentation_config

K = 10


def _ref_loss(ref, **aug):
    return ref.create_loss(augmentation_config(ref, **aug))[0]


def _logits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) * 3, torch.randint(0, K, (n,), generator=g)


def test_rows_use_at_most_one_target_transform():
    """The reference's create_loss takes the first of mixup > RICAP > CutMix > label smoothing >
    dual-cutout and ignores the rest; imgclf composes them (label smoothing of a mixed target).
    No table row combines two, so every row computes the reference's loss."""
    rows = 0
    for table in S.load_all(REPO / "config" / "tables", RECIPES).values():
        for row in table.rows:
            a = row.config.augmentation
            on = [a.use_mixup, a.use_ricap, a.use_cutmix, a.use_label_smoothing, a.use_dual_cutout]
            assert sum(on) <= 1, f"{table.name}/{row.id}"
            rows += any(on)
    assert rows > 30


def test_plain_cross_entropy(ref):
    z, y = _logits()
    theirs = _ref_loss(ref)(z, y)
    ours = losses.soft_cross_entropy(z, losses.one_hot(y, K))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epsilon", [0.001, 0.01, 0.1])  # the rows' epsilons
def test_label_smoothing(ref, epsilon):
    z, y = _logits()
    cfg = ref.get_default_config()
    cfg.augmentation.use_label_smoothing = True
    cfg.augmentation.label_smoothing.epsilon = epsilon
    cfg.dataset.n_classes = K
    theirs = ref.create_loss(cfg)[0](z, y)
    ours = losses.soft_cross_entropy(z, losses.smooth_targets(y, K, epsilon))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixer", ["use_mixup", "use_cutmix"])
@pytest.mark.parametrize("lam", [0.0, 0.137, 0.5, 0.93])
def test_mixup_and_cutmix(ref, mixer, lam):
    z, y = _logits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    theirs = _ref_loss(ref, **{mixer: True})(z, (y, y[perm], lam))
    t = losses.one_hot(y, K)
    ours = losses.soft_cross_entropy(z, torch.lerp(t[perm], t, lam))  # what our mixers return
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_ricap(ref):
    z, y = _logits()
    g = torch.Generator().manual_seed(2)
    perms = [torch.randperm(len(y), generator=g) for _ in range(4)]
    w, h, size = 11, 23, 32
    weights = [w * h / size**2, (size - w) * h / size**2, w * (size - h) / size**2,
               (size - w) * (size - h) / size**2]
    theirs = _ref_loss(ref, use_ricap=True)(z, ([y[p] for p in perms], weights))
    t = losses.one_hot(y, K)
    ours = losses.soft_cross_entropy(z, sum(wk * t[p] for wk, p in zip(weights, perms)))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.1])  # the rows' dual_cutout_alpha
def test_dual_cutout(ref, alpha):
    z1, y = _logits(seed=3)
    z2, _ = _logits(seed=4)
    cfg = ref.get_default_config()
    cfg.augmentation.use_dual_cutout = True
    cfg.augmentation.cutout.dual_cutout_alpha = alpha
    theirs = ref.create_loss(cfg)[0](torch.stack([z1, z2], dim=1), y)  # its (N, 2, K) outputs
    ours = losses.dual_cutout_loss(torch.cat([z1, z2]), losses.one_hot(y, K), alpha)  # our [view1; view2]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # and the prediction its accuracy uses: the mean of the two views' logits
    torch.testing.assert_close(losses.dual_cutout_predict(torch.cat([z1, z2])), (z1 + z2) / 2)


def test_engine_targets_reach_the_loss_as_the_reference(ref):
    """Through our pipeline: label smoothing's targets from TrainTransform give the reference's loss."""
    from imgclf.augment.pipeline import TrainTransform
    from imgclf.config import AugmentationConfig

    aug = AugmentationConfig(use_random_crop=False, use_random_horizontal_flip=False, use_label_smoothing=True)
    aug.label_smoothing.epsilon = 0.1
    z, y = _logits(n=16)
    batch = TrainTransform(aug, [0.5], [0.25], K, 8, torch.device("cpu"))(
        torch.zeros(16, 1, 8, 8, dtype=torch.uint8), y, torch.Generator().manual_seed(0))
    cfg = ref.get_default_config()
    cfg.augmentation.use_label_smoothing = True
    cfg.dataset.n_classes = K
    torch.testing.assert_close(losses.soft_cross_entropy(z, batch.targets), ref.create_loss(cfg)[0](z, y),
                               rtol=1e-6, atol=1e-6)
