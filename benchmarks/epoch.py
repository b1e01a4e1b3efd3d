"""CIFAR-size data for the benchmarks, and one epoch of the real engine on it.

The engine is run as it always is: ``imgclf.engine.Trainer`` on a run directory
holding a resolved ``config.yaml``. Its dataset comes from the decoded-tensor cache
(``imgclf.data.datasets``), so a benchmark injects a CIFAR10 cache of the size it
wants into a private ``$IMGCLF_CACHE_DIR`` and points the data root at nothing.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from imgclf import config as C, runs
from imgclf.data import datasets

from .common import PeakMemory

CIFAR_TRAIN_IMAGES = 50_000
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_cifar(n_train: int, n_test: int, seed: int = 0) -> datasets.Data:
    """Random uint8 3x32x32 images and labels; mean/std as the engine would compute them."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    mean, std = datasets._stats(train)
    return datasets.Data("CIFAR10", train, torch.randint(0, 10, (n_train,), generator=g), test,
                         torch.randint(0, 10, (n_test,), generator=g), list(CLASSES), mean, std)


def real_cifar(data_root: str | Path) -> datasets.Data:
    """CIFAR-10 as ``imgclf data CIFAR10 --root DATA_ROOT`` prepared it (decoded once, cached)."""
    return datasets.load("CIFAR10", root=data_root)


def subset(data: datasets.Data, n_train: int, n_test: int) -> datasets.Data:
    """The first ``n_train`` training images (repeated if the set is smaller)."""
    idx = torch.arange(n_train) % len(data.train_labels)
    return datasets.Data(data.name, data.train_images[idx], data.train_labels[idx], data.test_images[:n_test],
                         data.test_labels[:n_test], data.classes, data.mean, data.std)


@contextmanager
def injected_cache(data: datasets.Data, folder: Path):
    """``$IMGCLF_CACHE_DIR`` -> ``folder`` holding ``data`` as the CIFAR10 cache, for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets._write_cache(folder / "cifar10.pt", data, "builtin")
    saved = os.environ.get("IMGCLF_CACHE_DIR")
    os.environ["IMGCLF_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("IMGCLF_CACHE_DIR", None)
        else:
            os.environ["IMGCLF_CACHE_DIR"] = saved


def run_config(model_overrides: dict, *, precision: str, batch_size: int, device: torch.device,
               data_root: Path, recipe: Path) -> C.Config:
    return C.build(recipe, {**model_overrides, "train.precision": precision, "train.batch_size": batch_size,
                            "scheduler.epochs": 1, "device": str(device), "data_root": str(data_root),
                            "validation.batch_size": 512})


def engine_epoch(data: datasets.Data, workdir: Path, *, recipe: Path, model_overrides: dict, precision: str,
                 batch_size: int, device: torch.device) -> dict:
    """One epoch of the engine over ``data``: the engine's own ``epoch_seconds`` (loader, augmentation,
    steps; not the evaluation or the checkpoint) and the peak memory of the whole run."""
    from imgclf.engine import Trainer

    run_dir = workdir / f"run-{precision}"
    cfg = run_config(model_overrides, precision=precision, batch_size=batch_size, device=device,
                     data_root=workdir / "no-data-root", recipe=recipe)
    memory = PeakMemory(device)
    with injected_cache(data, workdir / f"cache-{precision}"):
        runs.prepare(cfg, run_dir, resume=False)
        memory.reset()
        trainer = Trainer(run_dir, progress=False)
        trainer.fit()
    row = trainer.log_rows[-1]
    return {"seconds": row["epoch_seconds"], "images": len(trainer.loader) * batch_size,
            "train_loss": row["train_loss"], "peak_bytes": memory.read()}
