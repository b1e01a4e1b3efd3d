"""The model a run trains, assembled from its config: built from the seed, BatchNorm synchronised
across ranks (train.dist.use_sync_bn), in the precision's dtype and the chosen memory format, run
per view (dual-cutout), wrapped in DDP over several ranks, and compiled (train.compile) with a
fallback to eager."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from imgclf import config as C
from imgclf.augment.dual_cutout import per_view_model
from imgclf.models import build as build_model

from .evaluator import use_channels_last
from .precision import Precision

log = logging.getLogger(__name__)

# train.compile's caches (inductor's FX graphs and generated kernels, Triton's autotuning results)
# go into the run directory unless the user chose a folder before imgclf was imported.
COMPILE_CACHE = "compile_cache"
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_run_compile_cache(run_dir: Path) -> Path:
    """Point inductor's cache at ``run_dir/compile_cache``: a requeued job (same run directory)
    loads the kernels its first attempt compiled and autotuned instead of paying for them again.
    Inductor reads the variable whenever it opens its cache, so setting it before the first
    compile is enough."""
    if _USER_INDUCTOR_CACHE:
        return Path(_USER_INDUCTOR_CACHE)
    path = (Path(run_dir) / COMPILE_CACHE).resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``train.dist.use_sync_bn``: every BatchNorm normalises with the statistics of the global
    batch (SyncBatchNorm). torch's DDP refuses SyncBatchNorm on CPU ranks, deep inside its
    constructor; say so here, in terms of the switch."""
    if device.type == "cpu":
        raise ValueError("train.dist.use_sync_bn: SyncBatchNorm needs GPU ranks (torch's DDP refuses it on CPU); "
                         "set it False to train on CPU ranks")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@dataclass
class Assembly:
    model: nn.Module  # the weights: what checkpoints and model.pt hold
    train_model: nn.Module  # the model as a training forward calls it: per view (dual-cutout)
    ddp_model: nn.Module  # what a step calls, uncompiled: per view, under DDP over several ranks
    step_model: nn.Module  # ddp_model compiled (train.compile), else ddp_model itself
    channels_last: bool
    n_params: int

    @property
    def compiled(self) -> bool:
        return self.step_model is not self.ddp_model


def assemble(cfg: C.Config, run_dir: Path, *, in_channels: int, n_classes: int, device: torch.device,
             precision: Precision, world_size: int) -> Assembly:
    torch.manual_seed(cfg.train.seed)  # model initialization
    model = build_model(cfg, in_channels=in_channels, n_classes=n_classes)
    n_params = sum(p.numel() for p in model.parameters())
    if world_size > 1 and cfg.train.dist.use_sync_bn:
        model = sync_batchnorm(model, device)
    channels_last = use_channels_last(cfg.train.channels_last, device, model)
    model = precision.cast_model(model.to(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = ddp_model = per_view_model(model, cfg.augmentation.use_dual_cutout)
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = ddp_model
    if cfg.train.compile:
        use_run_compile_cache(run_dir)
        try:
            step_model = torch.compile(ddp_model)
        except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
            log.warning("train.compile: torch.compile unavailable (%s); running eagerly", e)
    return Assembly(model, train_model, ddp_model, step_model, channels_last, n_params)


def compile_probe(a: Assembly, input_shape: tuple[int, ...], precision: Precision,
                  optimizer: torch.optim.Optimizer) -> None:
    """torch.compile compiles lazily, at the first call: a missing compiler or an unsupported
    model would surface in the first training step. Run one forward/backward of a zero batch
    of the training shape now (so the compiled graphs are the ones training reuses), fall back
    to eager on any failure, and restore every parameter, buffer and gradient it touched."""
    x = torch.zeros(input_shape, device=precision.device, dtype=precision.input_dtype)
    if a.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    saved = {k: v.clone() for k, v in a.model.state_dict().items()}
    try:
        with precision.autocast():
            out = a.step_model(x)
        out.float().sum().backward()
    except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning("train.compile: torch.compile failed on this model/device (%s: %s); running eagerly",
                    type(e).__name__, first[:200])
        a.step_model = a.ddp_model
    finally:
        a.model.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)
