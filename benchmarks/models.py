"""Training throughput of every model family: images per second of one SGD step.

    python -m benchmarks.models            # each family's CIFAR recipe at its own batch size, current device
    python -m benchmarks.models --smoke    # tiny configurations, one window: a seconds-long check

A step is the engine's own training step (``imgclf.engine.step.Step``: forward, the
soft-target loss, backward, the recipe's optimizer update and its learning-rate schedule,
under the precision's autocast and loss scaler) on random 3x32x32 images, by default in
channels_last layout (the engine's default). Each family is warmed up first (cuDNN autotuning, oneDNN primitives,
allocator), then timed over several windows; the table reports the median window and
the spread. ``python -m benchmarks.run`` runs this for every family beside the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from imgclf import catalog, config, losses, models
from imgclf.augment.pipeline import Batch
from imgclf.engine.precision import Precision
from imgclf.engine.step import Step
from imgclf.models.summary import summarize
from imgclf.optim import build_optimizer, build_scheduler

from .common import (PeakMemory, Timing, available_memory, device_title, resolve_device, time_windows,
                     trim)

RECIPES = Path(__file__).resolve().parents[1] / "config" / "recipes" / "cifar"

# Narrow and shallow, with each family's structure intact: a smoke run proves the
# harness works on every family, not anything about speed.
SMOKE = {
    "vgg": dict(n_channels=[8, 16, 32], n_layers=[1, 1, 1]),
    "resnet": dict(depth=8, initial_channels=8),
    "resnet_preact": dict(depth=8, initial_channels=8),
    "se_resnet_preact": dict(depth=8, initial_channels=8, se_reduction=4),
    "wrn": dict(depth=10, widening_factor=1, initial_channels=8),
    "densenet": dict(depth=10, block_type="bottleneck", growth_rate=8),
    "pyramidnet": dict(depth=11, block_type="bottleneck", alpha=12, initial_channels=8),
    "resnext": dict(depth=11, cardinality=2, base_channels=4, initial_channels=8),
    "shake_shake": dict(depth=8, initial_channels=8),
}


def describe(cfg: config.Config) -> str:
    options = dataclasses.asdict(getattr(cfg.model, cfg.model.name))
    options.pop("n_blocks", None)  # ImageNet-style option, unused by the CIFAR models
    return " ".join(f"{k}={v}" for k, v in options.items())


def recipe(name: str, smoke: bool) -> config.Config:
    """The family's seed configuration (``config/recipes/cifar/<name>.yaml``), or its smoke miniature."""
    overrides = {f"model.{name}.{k}": v for k, v in SMOKE[name].items()} if smoke else {}
    return config.build(RECIPES / f"{name}.yaml", overrides)


def train_step(cfg: config.Config, device: torch.device, *, batch_size: int, precision: str = "fp32",
               channels_last: bool = True, compile_mode: str | None = None):
    """(step, model): the engine's training step of ``cfg``'s model on a fixed random batch; with
    ``compile_mode``, the model's forward and backward through ``torch.compile(mode=...)``."""
    mode = Precision(precision, device)
    model = mode.cast_model(models.build(cfg, in_channels=3, n_classes=10).to(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model
    opt = build_optimizer(cfg, model)
    # the schedule of a CIFAR epoch's steps at this batch, as training steps it
    scheduler = build_scheduler(cfg, opt, max(1, 50_000 // batch_size))
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    batch = Batch(x, losses.one_hot(y, 10), y)
    engine_step = Step.of(cfg, model, forward, opt, scheduler, mode, channels_last=channels_last)

    def step() -> None:
        engine_step(batch)

    return step, model


def fitting_batch(cfg: config.Config, device: torch.device, batch: int, budget: int, **step_options) -> int:
    """The largest of batch, batch/2, batch/4, ... whose training step should fit ``budget`` bytes
    (CPU). Two probe steps (batch 8 and 16) give the peak resident memory per image; the
    estimate takes it 1.5 times, as the allocator may reuse pages the probe freed."""
    if batch <= 16:
        return batch
    memory = PeakMemory(device)
    memory.reset()
    base = memory.current()
    peaks = []
    for probe in (8, 16):
        step, model = train_step(cfg, device, batch_size=probe, **step_options)
        step()
        del step, model
        peaks.append(memory.read())
    per_image = max(peaks[1] - peaks[0], 0) / 8
    while batch > 16 and (peaks[1] - base) + 1.5 * per_image * (batch - 16) > budget:
        batch //= 2
    return batch


def benchmark(name: str, device: torch.device, *, smoke: bool = False, batch_size: int | None = None,
              precision: str = "fp32", channels_last: bool = True, warmup: int = 5, windows: int = 5,
              steps: int = 10, max_seconds: float | None = None, memory_fraction: float | None = None) -> dict:
    """One family at its recipe's batch size (or ``batch_size``): throughput and peak memory.

    ``memory_fraction`` (CPU): when the step's estimated peak exceeds that fraction of the
    memory available now, the batch is halved until it fits, and the result says so.
    """
    cfg = recipe(name, smoke)
    batch = wanted = batch_size or cfg.train.batch_size
    notes = []
    trim()  # what an earlier family left in the C heap counts as available
    available = available_memory()
    if memory_fraction and device.type == "cpu" and available:
        batch = fitting_batch(cfg, device, batch, int(memory_fraction * available), precision=precision,
                              channels_last=channels_last)
        if batch != wanted:
            notes.append(f"batch {batch}, not the recipe's {wanted}: {wanted} would not fit in "
                         f"{memory_fraction:.0%} of the {available / 2**30:.0f} GiB available")
    memory = PeakMemory(device)
    while True:
        memory.reset()
        torch.manual_seed(0)
        try:
            step, model = train_step(cfg, device, batch_size=batch, precision=precision,
                                     channels_last=channels_last)
            timing: Timing = time_windows(step, device, items=batch, warmup=warmup, windows=windows,
                                          steps=steps, max_seconds=max_seconds)
            break
        except torch.OutOfMemoryError:  # CUDA: halve the batch, as on CPU, and say so
            if device.type != "cuda" or batch == 1:
                raise
            step = model = None
            torch.cuda.empty_cache()
            batch //= 2
            notes[:] = [f"batch {batch}, not the recipe's {wanted}: out of device memory"]
    timing.notes[:0] = notes
    info = summarize(model, (3, 32, 32))
    return {"name": name, "config": describe(cfg), "batch": batch, "params": info["params"],
            "macs": info["macs"], "timing": timing, "median": timing.median, "min": min(timing.rates),
            "max": max(timing.rates), "peak_bytes": memory.read(), "precision": precision}


def render(rows: list[dict], args, device: torch.device) -> str:
    head = (f"Training throughput, 3x32x32, {'channels_last' if not args.nchw else 'NCHW'}, {args.precision}, "
            f"on {device_title(device)}, torch {torch.__version__}; median of up to {args.windows} window(s) of "
            f"{args.steps} step(s) after {args.warmup} warm-up step(s)"
            + (" [SMOKE: tiny configurations, not representative]" if args.smoke else ""))
    lines = [head, "", "| Model | Configuration | Batch | Params (M) | MACs/image (M) | img/s (median) | min–max | "
             "Windows | Notes |", "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        t = r["timing"]
        lines.append(f"| {r['name']} | {r['config']} | {r['batch']} | {r['params'] / 1e6:.2f} | "
                     f"{r['macs'] / 1e6:.1f} | {r['median']:.0f} | {t.spread} | {t.windows} | "
                     f"{'; '.join(t.notes)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configurations and one short window")
    parser.add_argument("--models", nargs="+", default=list(catalog.model_names()), choices=list(catalog.model_names()))
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (smoke: 32)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows (default 5; smoke: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 10; smoke: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke: 1)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time budget per family (default none)")
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="CPU: halve a batch whose estimated peak exceeds this share of the available memory "
                             "(0 = never)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "amp"],
                        help="fp32, bf16 autocast, or amp (fp16 autocast, CUDA)")
    parser.add_argument("--bf16", action="store_true", help="shorthand for --precision bf16")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if args.bf16:
        args.precision = "bf16"
    defaults = dict(batch_size=32, windows=1, steps=2, warmup=1) if args.smoke else \
        dict(batch_size=None, windows=5, steps=10, warmup=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.windows < 1 or args.steps < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--windows, --steps and --batch-size must be >= 1")
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    rows = [benchmark(name, device, smoke=args.smoke, batch_size=args.batch_size, precision=args.precision,
                      channels_last=not args.nchw, warmup=args.warmup, windows=args.windows, steps=args.steps,
                      max_seconds=args.max_seconds, memory_fraction=None if args.smoke else args.memory_fraction)
            for name in args.models]
    print(render(rows, args, device))


if __name__ == "__main__":
    main()
