"""The plain reference: how a typical CIFAR repository trains, for ``benchmarks.run`` to compare against.

Per-sample torchvision transforms on PIL images (RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize) in ``DataLoader`` worker processes over
an in-memory uint8 dataset (as ``torchvision.datasets.CIFAR10`` holds it: HWC
arrays, one ``Image.fromarray`` per sample), NCHW fp32 model, ``torch.optim.SGD``
with its defaults, ``nn.CrossEntropyLoss``, no compile.
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

from imgclf import config, models

from .common import autocast, sync

NUM_WORKERS = 2


class InMemoryCIFAR(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) served one PIL image at a time, like torchvision's CIFAR10."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # HWC, as CIFAR10.data
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def transform(mean: list[float], std: list[float], *, augment: bool = True, padding: int = 4, size: int = 32):
    steps = [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def loader(dataset, batch_size: int, *, seed: int = 0, workers: int = NUM_WORKERS,
           persistent: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=persistent and workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


class PlainTraining:
    """A recipe's model trained the plain way: NCHW, ``torch.optim.SGD`` defaults, CrossEntropyLoss."""

    def __init__(self, cfg: config.Config, device: torch.device, precision: str = "fp32"):
        torch.manual_seed(cfg.train.seed)
        self.device, self.precision = device, precision
        self.model = models.build(cfg, in_channels=3, n_classes=10).to(device).train()
        t = cfg.train
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.base_lr, momentum=t.momentum,
                                         nesterov=t.nesterov, weight_decay=t.weight_decay)
        self.criterion = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp")

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad()
        with autocast(self.device, self.precision):
            loss = self.criterion(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    def epoch(self, batches) -> tuple[float, int]:
        """(seconds, images) of one pass over ``batches``, data loading included; the typical
        loop's ``loss.item()`` per step is kept, as its logging needs it."""
        sync(self.device)
        t0 = time.perf_counter()
        seen = 0
        for x, y in batches:
            self.step(x, y).item()
            seen += len(y)
        sync(self.device)
        return time.perf_counter() - t0, seen


def endless(batches: torch.utils.data.DataLoader) -> Iterator:
    """Batches forever (persistent workers are not re-forked between passes)."""
    while True:
        yield from batches
