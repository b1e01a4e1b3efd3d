"""Throughput of each batched regularizer against one ResNet-PreAct-20 training step.

    python -m benchmarks.augment [--smoke] [--device cpu|cuda] [--batch-size 128]

Prints a Markdown table: images per second of each method on a CIFAR-size float
batch on the chosen device, and its time as a percentage of one SGD step of
ResNet-PreAct-20 (channels_last) at the same batch size. The target is < 5 %:
augmentation should never be the reason a step is slow. --smoke runs each
measurement once, to check that the script works in seconds.
"""
from __future__ import annotations

import argparse
import platform
from typing import Callable

import torch
import torch.nn.functional as F

from imgclf import models
from imgclf.augment.cutmix import cutmix
from imgclf.augment.cutout import cutout
from imgclf.augment.dual_cutout import dual_cutout_views
from imgclf.augment.mixup import mixup
from imgclf.augment.random_erasing import random_erasing
from imgclf.augment.ricap import ricap
from imgclf.config import AugmentationConfig
from imgclf.losses import smooth_targets

from .common import seconds_per_call


def methods(x: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> dict[str, Callable[[], object]]:
    """Every method with the recipe defaults from :class:`AugmentationConfig`."""
    aug = AugmentationConfig()
    co, re = aug.cutout, aug.random_erasing
    y = smooth_targets(labels, 10, 0.0)
    cut = dict(mask_size=co.mask_size, prob=co.prob, cut_inside=co.cut_inside, mask_color=float(co.mask_color))
    return {
        f"cutout ({co.mask_size}px)": lambda: cutout(x, **cut, generator=g),
        "random erasing": lambda: random_erasing(x, prob=re.prob, area_ratio_range=re.area_ratio_range,
                                                 min_aspect_ratio=re.min_aspect_ratio,
                                                 max_attempt=re.max_attempt, generator=g),
        "dual-cutout views (2N out)": lambda: dual_cutout_views(x, **cut, generator=g),
        f"mixup (α={aug.mixup.alpha:g})": lambda: mixup(x, y, alpha=aug.mixup.alpha, generator=g),
        f"cutmix (α={aug.cutmix.alpha:g})": lambda: cutmix(x, y, alpha=aug.cutmix.alpha, generator=g),
        f"ricap (β={aug.ricap.beta:g})": lambda: ricap(x, y, beta=aug.ricap.beta, generator=g),
        f"label smoothing (ε={aug.label_smoothing.epsilon:g})":
            lambda: smooth_targets(labels, 10, aug.label_smoothing.epsilon),
    }


def train_step_fn(x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One SGD step of ResNet-PreAct-20 at this batch, channels_last, fp32."""
    model = models.create("resnet_preact", depth=20, in_channels=3, n_classes=10).to(x.device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    inputs = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one repetition of everything")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps, warmup, step_reps = (1, 0, 1) if args.smoke else (50, 5, 5)

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g, device=device)

    step = seconds_per_call(train_step_fn(x, labels), device, step_reps, 1 if not args.smoke else 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); torch {torch.__version__}; batch {args.batch_size} x 3x32x32 float32; "
          f"median of {reps} calls ({step_reps} steps){' [smoke]' if args.smoke else ''}\n")
    print("| method | ms / batch | img/s | % of a ResNet-PreAct-20 step |")
    print("|---|---:|---:|---:|")
    for name, fn in methods(x, labels, g).items():
        t = seconds_per_call(fn, device, reps, warmup)
        print(f"| {name} | {t * 1e3:.3f} | {args.batch_size / t:,.0f} | {100 * t / step:.2f} % |")
    print(f"| *ResNet-PreAct-20 SGD step* | {step * 1e3:.1f} | {args.batch_size / step:,.0f} | 100 % |")


if __name__ == "__main__":
    main()
