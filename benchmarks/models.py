"""Training throughput of every model family: images per second of one SGD step.

    python -m benchmarks.models            # each family's CIFAR recipe, batch 128, current device
    python -m benchmarks.models --smoke    # tiny configurations, one window: a seconds-long check

A step is forward + backward + SGD update on random 3x32x32 images in
channels_last layout (the engine's default), with the recipe's optimizer settings.
Each family is warmed up first (cuDNN autotuning, allocator), then timed over
several windows; the table reports the median window and the spread.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from imgclf import config, models
from imgclf.models.summary import summarize

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(cfg: config.Config) -> str:
    options = dataclasses.asdict(getattr(cfg.model, cfg.model.name))
    options.pop("n_blocks", None)  # ImageNet-style option, unused by the CIFAR models
    return " ".join(f"{k}={v}" for k, v in options.items())


def benchmark(name: str, args, device: torch.device) -> dict:
    overrides = {f"model.{name}.{k}": v for k, v in SMOKE[name].items()} if args.smoke else {}
    cfg = config.build(RECIPES / f"{name}.yaml", overrides)
    model = models.build(cfg, in_channels=3, n_classes=10).to(device, memory_format=torch.channels_last)
    info = summarize(model, (3, 32, 32))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.base_lr, momentum=cfg.train.momentum,
                          nesterov=cfg.train.nesterov, weight_decay=cfg.train.weight_decay)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.windows):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    return {"name": name, "config": describe(cfg), "params": info["params"], "macs": info["macs"],
            "median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def render(rows: list[dict], args, device: torch.device) -> str:
    head = (f"Training throughput, batch {args.batch_size}, 3x32x32, channels_last, "
            f"{'bf16 autocast' if args.bf16 else 'fp32'}, on {device_name(device)}, torch {torch.__version__}; "
            f"median of {args.windows} window(s) of {args.steps} step(s) after {args.warmup} warm-up step(s)"
            + (" [SMOKE: tiny configurations, not representative]" if args.smoke else ""))
    lines = [head, "", "| Model | Configuration | Params (M) | MACs/image (M) | img/s (median) | min–max |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['config']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e6:.1f} | "
                     f"{r['median']:.0f} | {r['min']:.0f}–{r['max']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configurations and one short window")
    parser.add_argument("--models", nargs="+", default=sorted(config.MODEL_NAMES), choices=sorted(config.MODEL_NAMES))
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (smoke: 32)")
    parser.add_argument("--windows", type=int, default=None, help="timed windows (default 5; smoke: 1)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (default 10; smoke: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke: 1)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    defaults = dict(batch_size=32, windows=1, steps=2, warmup=1) if args.smoke else \
        dict(batch_size=128, windows=5, steps=10, warmup=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.windows < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--windows, --steps and --batch-size must be >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    torch.manual_seed(0)
    rows = [benchmark(name, args, device) for name in args.models]
    print(render(rows, args, device))


if __name__ == "__main__":
    main()
