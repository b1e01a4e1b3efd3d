"""Where a run's training batches come from: the training split, and the augmented batches of
each epoch from one of three sources, all giving the same numbers where their draws agree:

- per step (the default): each step's batch is augmented when the step asks for it;
- the epoch's buffer (train.epoch_augmentation): every batch of the rest of the epoch is
  augmented, with the per-step draws, before its first step;
- batched draws (train.epoch_augmentation_draws batched): the per-sample transforms of a chunk
  of steps in one call, the mixer per step; resident for the epoch when the chunks fit.

Every draw comes from a generator seeded by (seed, epoch, step) (a chunk's, by (seed, epoch,
its first step, 1)), so a batch is the same whenever, and in whichever order, it is made.
Every rank draws the augmentation of the whole global batch from the same generator and keeps
its own shard, so N ranks compute exactly what one process would at that batch.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator

import torch

from imgclf import config as C
from imgclf.augment.pipeline import Batch, TrainTransform
from imgclf.data import Data, DeviceLoader, derive_seed

from .precision import Precision

log = logging.getLogger(__name__)
# train.epoch_augmentation_draws batched: samples per per-sample transform call (whole global
# batches; a fixed number, so the draws do not depend on the memory budget). 16384 makes a CIFAR
# epoch in 4 calls; its float32 intermediates stay around 1 GB.
BATCHED_CHUNK_SAMPLES = 16384


def validation_split(n: int, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of ``n`` training images, as the reference's random_split
    draws them: ``int(n * ratio)`` held out, a permutation from ``seed`` alone (so every rank and
    every resume holds out the same images)."""
    n_val = int(n * ratio)
    if not 0 < n_val < n:
        raise ValueError(f"train.val_ratio: {ratio:g} of {n} training images holds out {n_val}; "
                         "choose a ratio that holds out at least one image and keeps one")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n - n_val], perm[n - n_val:]


def training_split(cfg: C.Config, data: Data, device: torch.device):
    """(loader of the training images, held-out (images, labels) on ``device`` or None): with
    train.use_test_as_val False a validation split is held out of the training set."""
    images, labels = data.train_images, data.train_labels
    held_out = None
    if not cfg.train.use_test_as_val:
        train_idx, val_idx = validation_split(len(labels), cfg.train.val_ratio, cfg.train.seed)
        held_out = images[val_idx].to(device), labels[val_idx].to(device)
        images, labels = images[train_idx], labels[train_idx]
    loader = DeviceLoader(images, labels, cfg.train.batch_size, shuffle=True,
                          drop_last=cfg.train.dataloader.drop_last, seed=cfg.train.seed, device=device,
                          reshuffle=cfg.train.dist.reshuffle_every_epoch)
    if len(loader) == 0:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the "
                         f"{len(labels)} training images")
    return loader, held_out


class BatchSource:
    """This rank's augmented training batches, epoch by epoch (see the module's docstring)."""

    def __init__(self, cfg: C.Config, loader: DeviceLoader, transform: TrainTransform, data: Data,
                 n_classes: int, precision: Precision, device: torch.device, *, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
        self.cfg, self.loader, self.transform = cfg, loader, transform
        self.sample_pixels, self.n_classes = data.n_channels * data.image_size ** 2, n_classes
        self.precision, self.device, self.channels_last = precision, device, channels_last
        self.rank, self.world_size = rank, world_size
        self._warned_buffer = False

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Callable[[], Batch]]]:
        """(step, a function giving the step's batch) for the steps of ``epoch`` from ``start`` on."""
        cfg = self.cfg.train
        if cfg.epoch_augmentation and cfg.epoch_augmentation_draws == "batched":
            yield from self._batched(epoch, start)
            return
        batches = self.loader.batches(epoch, start=start)
        if not (cfg.epoch_augmentation and self.fits(start)):
            for step, images, labels in batches:
                yield step, lambda s=step, i=images, y=labels: self.augment(epoch, s, i, y)
            return
        buffer = []  # the rest of the epoch, made before its first step
        for step, images, labels in batches:
            buffer.append((step, self._to_buffer(self.augment(epoch, step, images, labels))))
        for step, b in buffer:
            yield step, lambda b=b: b

    def augment(self, epoch: int, step: int, images: torch.Tensor, labels: torch.Tensor,
                per_sample: torch.Tensor | None = None) -> Batch:
        """This rank's augmented batch of ``step``. ``per_sample``: the images already through
        the per-sample transforms (batched draws); then only the mixer draws from the generator."""
        dist_cfg, t = self.cfg.train.dist, self.transform
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.train.seed, epoch, step))
        if dist_cfg.augment_per_rank and self.world_size > 1 and per_sample is None:
            # as the reference's identically seeded workers: this rank's shard drawn as a whole batch,
            # so every rank draws the same parameters for the same position; the mixer is per rank too
            r, w = self.rank, self.world_size
            return t.per_batch(t.per_sample(images[r::w], gen), labels[r::w], gen)
        x = t.per_sample(images, gen) if per_sample is None else per_sample
        if dist_cfg.mixer_per_rank and self.world_size > 1:  # as the reference's per-process collator
            return t.per_batch(x, labels, gen, mix_shard=(self.rank, self.world_size))
        return t.per_batch(x, labels, gen).shard(self.rank, self.world_size)

    def fits(self, start: int) -> bool:
        """The buffer holds the inputs, targets and labels of the epoch's steps from ``start`` on:
        above train.epoch_augmentation_max_gb, augment per step instead (the same numbers, slower)."""
        cfg = self.cfg.train
        per_sample = (self.sample_pixels * self.precision.buffer_dtype.itemsize * self.transform.views
                      + 4 * self.n_classes + 8)
        need = (len(self.loader) - start) * (cfg.batch_size // self.world_size) * per_sample
        if need <= cfg.epoch_augmentation_max_gb * 2 ** 30:
            return True
        if not self._warned_buffer:
            fallback = "making one chunk at a time" if cfg.epoch_augmentation_draws == "batched" \
                else "augmenting per step"
            log.warning("train.epoch_augmentation: the epoch's buffer needs %.2f GB, more than "
                        "train.epoch_augmentation_max_gb %g; %s", need / 2 ** 30, cfg.epoch_augmentation_max_gb,
                        fallback)
            self._warned_buffer = True
        return False

    def _to_buffer(self, b: Batch) -> Batch:
        x = b.images.to(self.precision.buffer_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return Batch(x, b.targets, b.labels, b.views)

    def _batched(self, epoch: int, start: int):
        """The per-sample transforms of a chunk of ``BATCHED_CHUNK_SAMPLES // batch_size`` steps in
        one call, each step's mixer from its own generator. All chunks of the rest of the epoch
        are made at its start when they fit the budget, else one at a time: the same numbers. A
        resume remakes the chunk it stopped in and skips its done steps."""
        per_chunk = max(1, BATCHED_CHUNK_SAMPLES // self.cfg.train.batch_size)
        first = start - start % per_chunk
        batches = self.loader.batches(epoch, start=first)
        chunks = (self._chunk(epoch, list(itertools.islice(batches, per_chunk)))
                  for _ in range(first, len(self.loader), per_chunk))
        if self.fits(start):
            chunks = list(chunks)  # resident: the whole rest of the epoch before its first step
        for chunk in chunks:
            for step, b in chunk:
                if step >= start:
                    yield step, lambda b=b: b

    def _chunk(self, epoch: int, steps) -> list[tuple[int, Batch]]:
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.cfg.train.seed, epoch, steps[0][0], 1))  # 4 parts: apart from the step seeds
        x = self.transform.per_sample(torch.cat([images for _, images, _ in steps]), gen)
        out, at = [], 0
        for step, images, labels in steps:
            xs, at = x[at:at + len(images)], at + len(images)
            out.append((step, self._to_buffer(self.augment(epoch, step, images, labels, per_sample=xs))))
        return out
