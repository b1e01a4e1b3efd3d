"""The training and evaluation transforms, assembled from ``augmentation.*``.

Order (as in the reference): random crop, flip, normalize, then cutout / random erasing
on the normalized image (so cutout's fill 0 is the dataset mean), then a batch mixer
(mixup | cutmix | ricap) producing soft targets. Label smoothing makes soft targets too,
so one soft-target cross-entropy serves all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from imgclf.config import AugmentationConfig

from . import basic


@dataclass
class Batch:
    """N samples seen in ``views`` views: ``images`` holds view after view, ``[view1; view2; ...]``
    (dual-cutout: 2), so sample i of view v is row ``v * N + i``."""
    images: torch.Tensor  # float, normalized; (views * N, ...)
    targets: torch.Tensor  # soft targets (N, K)
    labels: torch.Tensor  # hard labels (N,): the dominant label, for training accuracy
    views: int = 1

    def __len__(self) -> int:
        return len(self.labels)

    def view_images(self, index: slice) -> torch.Tensor:
        """The images of samples ``index`` in every view, view after view."""
        if self.views == 1:
            return self.images[index]
        n = len(self.labels)
        return torch.cat([self.images[v * n:(v + 1) * n][index] for v in range(self.views)])

    def shard(self, rank: int, world_size: int) -> "Batch":
        """Rank ``rank``'s part of a global batch: every world_size-th sample, in every view."""
        if world_size == 1:
            return self
        part = slice(rank, None, world_size)
        return Batch(self.view_images(part), self.targets[part], self.labels[part], self.views)


class TrainTransform:
    def __init__(self, aug: AugmentationConfig, mean: list[float], std: list[float], n_classes: int,
                 image_size: int, device: torch.device):
        self.aug, self.n_classes = aug, n_classes
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        if (aug.use_cutout or aug.use_dual_cutout) and aug.cutout.mask_size > image_size:
            raise ValueError(f"augmentation.cutout.mask_size {aug.cutout.mask_size} is larger than the "
                             f"{image_size}x{image_size} images")

    @property
    def views(self) -> int:
        """How many views of each sample a batch holds (dual-cutout: two)."""
        return 2 if self.aug.use_dual_cutout else 1

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                 mix_shard: tuple[int, int] | None = None) -> Batch:
        """``mix_shard=(rank, world_size)``: keep only that rank's samples (every world_size-th)
        before the batch mixer, which then mixes them alone (train.dist.mixer_per_rank)."""
        x = self.per_sample(images, generator)
        return self.per_batch(x, labels, generator, mix_shard)

    def per_sample(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Crop, flip, normalize, cutout, random erasing: every draw is per sample, so this runs
        on any number of samples at once (train.epoch_augmentation_draws batched: a whole chunk
        of the epoch's batches in one call)."""
        a = self.aug
        x = images.float()
        if a.use_random_crop:
            x = basic.random_crop(x, padding=a.random_crop.padding, fill=float(a.random_crop.fill),
                                  padding_mode=a.random_crop.padding_mode, generator=generator)
        if a.use_random_horizontal_flip:
            x = basic.horizontal_flip(x, prob=a.random_horizontal_flip.prob, generator=generator)
        x = basic.normalize(x, self.mean, self.std)
        if a.use_cutout:
            from .cutout import cutout

            x = cutout(x, mask_size=a.cutout.mask_size, prob=a.cutout.prob, cut_inside=a.cutout.cut_inside,
                       mask_color=float(a.cutout.mask_color), generator=generator)
        if a.use_random_erasing:
            from .random_erasing import random_erasing

            e = a.random_erasing
            x = random_erasing(x, prob=e.prob, area_ratio_range=e.area_ratio_range,
                               min_aspect_ratio=e.min_aspect_ratio, max_attempt=e.max_attempt, generator=generator)
        return x

    def per_batch(self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  mix_shard: tuple[int, int] | None = None) -> Batch:
        """Targets, then the batch mixer (one lambda per batch) and dual-cutout's views, on one
        step's per-sample-augmented images."""
        from imgclf import losses

        a = self.aug
        if a.use_label_smoothing:
            y = losses.smooth_targets(labels, self.n_classes, a.label_smoothing.epsilon)
        else:
            y = losses.one_hot(labels, self.n_classes)
        if mix_shard is not None:
            rank, world = mix_shard
            x, y, labels = x[rank::world], y[rank::world], labels[rank::world]
        if a.use_mixup:
            from .mixup import mixup

            x, y = mixup(x, y, alpha=a.mixup.alpha, generator=generator)
        elif a.use_cutmix:
            from .cutmix import cutmix

            x, y = cutmix(x, y, alpha=a.cutmix.alpha, generator=generator)
        elif a.use_ricap:
            from .ricap import ricap

            x, y = ricap(x, y, beta=a.ricap.beta, generator=generator, offsets=a.ricap.offsets)
        if a.use_dual_cutout:
            from .dual_cutout import dual_cutout_views

            x = dual_cutout_views(x, mask_size=a.cutout.mask_size, prob=a.cutout.prob,
                                  cut_inside=a.cutout.cut_inside, mask_color=float(a.cutout.mask_color),
                                  generator=generator)
        return Batch(x, y, y.argmax(dim=1), self.views)


class EvalTransform:
    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return basic.normalize(images.float(), self.mean, self.std)
