"""The device loader: a dataset resident on the training device, shuffled per epoch by a
generator seeded from (seed, epoch), each global batch sharded across DDP ranks.

Sharding takes every ``world_size``-th sample of each *global* batch, so N ranks see
exactly the samples one process would see at the same global batch size.
"""
from __future__ import annotations

from typing import Iterator

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, step, ...): independent streams per step."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class DeviceLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", reshuffle: bool = True):
        if batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by the world size {world_size}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must be >= 1 and rank {rank} in [0, {world_size})")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.reshuffle = reshuffle  # False: epoch 0's order every epoch (train.dist.reshuffle_every_epoch)
        self.device = torch.device(device)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch if self.reshuffle else 0, 0xDA7A))
        return torch.randperm(n, generator=g)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, images, labels) for this rank, from step ``start`` (mid-epoch resume)."""
        order = self.order(epoch).to(self.device)
        for step in range(start, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size][self.rank::self.world_size]
            yield step, self.images[idx], self.labels[idx]
