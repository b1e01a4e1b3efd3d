"""The trainer's own training step, for the GPU benchmarks: a real :class:`imgclf.engine.Trainer`
built from a recipe and overrides (so train.compile, the precisions and the speed-path options
are the trainer's code paths, not a re-implementation), stepped as ``Trainer._train_epoch``
steps it: the batch from its batch source (per-step augmentation or the epoch's buffer), the
per-(seed, epoch, step) reseed, its step function (forward, backward, optimizer, scheduler).
Checkpoints, the stop check and the log stay out: they are per epoch, not per step.

``IMGCLF_BENCH_FIRST_STEP_DELAY`` (seconds) makes the first step that much slower, as a long
compile would: the session's CPU test shows that the rate reported is the steady state's.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from imgclf import config as C, runs
from imgclf.calibrate import step_loop  # noqa: F401 - the one step loop, which the benchmarks time

ROOT = Path(__file__).resolve().parents[1] / "config" / "recipes"
SMOKE_RECIPE = ROOT / "digits" / "resnet_preact.yaml"

# name -> (family, the CIFAR recipe's overrides; the smoke miniature's overrides on the digits)
MODELS = {
    "resnet_preact20": ("resnet_preact", {"depth": 20}, {"depth": 8, "initial_channels": 8}),
    "resnet_preact56": ("resnet_preact", {"depth": 56}, {"depth": 14, "initial_channels": 8}),
    "wrn28_10": ("wrn", {"depth": 28, "widening_factor": 10}, {"depth": 10, "widening_factor": 1,
                                                               "initial_channels": 8}),
}


def build_config(model: str, overrides: dict, *, smoke: bool, batch_size: int, device: str) -> C.Config:
    family, full, small = MODELS[model]
    recipe = SMOKE_RECIPE if smoke else ROOT / "cifar" / f"{family}.yaml"
    model_keys = {f"model.{family}.{k}": v for k, v in (small if smoke else full).items()}
    # Many epochs: the schedule never runs out however many steps are timed.
    return C.build(recipe, {"model.name": family, **model_keys, "train.batch_size": batch_size,
                            "scheduler.epochs": 200, "device": device, **overrides})


def _load_once() -> None:
    """The dataset is read once per process, not once per measurement: loading (seconds for
    CIFAR-10) is no part of a step, and a session builds a dozen trainers."""
    from imgclf.engine import trainer as engine

    if not hasattr(engine.load_data, "cache_info"):
        engine.load_data = functools.lru_cache(maxsize=2)(engine.load_data)


def build_trainer(cfg: C.Config, run_dir: Path | None = None):
    from imgclf.engine import Trainer

    _load_once()
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    return Trainer(runs.prepare(cfg, run_dir, resume=False), progress=False)



def compiled(trainer) -> bool:
    """train.compile took: the trainer steps the compiled model (else it fell back to eager)."""
    return trainer.step.forward is not trainer.ddp_model


def free_device() -> None:
    """Free what the last measurement held (drop the trainer first) before the next one."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - nothing compiled, nothing to reset
        pass
