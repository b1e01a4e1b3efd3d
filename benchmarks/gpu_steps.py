"""Training-step throughput of the trainer itself (imgclf's Trainer and its step function) in
every configuration it offers: fp32 (IEEE), tf32, AMP fp16, bf16, the speed-path options
(train.epoch_augmentation, per-step and batched draws) and train.compile, for ResNet-PreAct-20
and WRN-28-10 at batch 128 on CIFAR-10; one JSON line per measurement as soon as it is measured.

    python -m benchmarks.gpu_steps --device cuda --jsonl $OUT/steps.jsonl --out $OUT/steps.md
    python -m benchmarks.gpu_steps --device cpu --smoke --jsonl /tmp/steps.jsonl   # digits, seconds

Each measurement: the Trainer is built (data, model, and under train.compile its compile
probe, timed on its own as ``compile_s``), then untimed warm-up steps (the first one, with
cuDNN's algorithm search and any recompile, timed on its own as ``first_step_s``), then the
timed windows (``--max-seconds`` budgets these alone). Every eager configuration comes before
any compiled one, so a session cut short still has the whole eager table. A measurement that
fails is a line with its error; the others go on.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import device_title, resolve_device, time_windows
from .trainer_steps import MODELS, build_config, build_trainer, compiled, free_device, step_loop

# The trainer's configurations, eager ones first; name -> config overrides.
CONFIGS = {
    "fp32": {"train.precision": "fp32"},
    "tf32": {"train.precision": "tf32"},
    "amp": {"train.precision": "amp"},
    "bf16": {"train.precision": "bf16"},
    "amp+epoch_augmentation": {"train.precision": "amp", "train.epoch_augmentation": True},
    "amp+epoch_augmentation_batched": {"train.precision": "amp", "train.epoch_augmentation": True,
                                       "train.epoch_augmentation_draws": "batched"},
    "amp+compile": {"train.precision": "amp", "train.compile": True},
    "amp+compile+epoch_augmentation_batched": {"train.precision": "amp", "train.compile": True,
                                               "train.epoch_augmentation": True,
                                               "train.epoch_augmentation_draws": "batched"},
}
DEFAULT_MODELS = ("resnet_preact20", "wrn28_10")


_COMPILE_SECONDS: list[float] = []  # the last trainer's compile probe, when it ran one


def _timed_compile_probe():
    """Record the seconds of the Trainer's compile probe (train.compile compiles there, before
    the first step) in ``_COMPILE_SECONDS``."""
    from imgclf.engine import assembly

    real = assembly.compile_probe
    if getattr(real, "timed", False):
        return

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            real(*args, **kwargs)
        finally:
            _COMPILE_SECONDS.append(time.perf_counter() - t0)

    timed.timed = True
    assembly.compile_probe = timed


def measure(model: str, name: str, device: torch.device, args) -> dict:
    cfg = build_config(model, CONFIGS[name], smoke=args.smoke, batch_size=args.batch_size, device=str(device))
    t0 = time.perf_counter()
    _COMPILE_SECONDS.clear()
    trainer = build_trainer(cfg)
    setup = time.perf_counter() - t0
    notes = []
    if cfg.train.compile and not compiled(trainer):
        notes.append("train.compile fell back to eager (see steps.log)")
    timing = time_windows(step_loop(trainer), device, items=args.batch_size, warmup=args.warmup,
                          windows=args.windows, steps=args.steps, max_seconds=args.max_seconds)
    row = {"model": model, "config": name, "overrides": CONFIGS[name], "batch": args.batch_size,
           "img_per_s": round(timing.median), "min": round(min(timing.rates)), "max": round(max(timing.rates)),
           "windows": timing.windows, "setup_s": round(setup, 2),
           "compile_s": round(sum(_COMPILE_SECONDS), 2),
           "compiled": compiled(trainer), "first_step_s": round(timing.first_step_seconds, 3),
           "warmup_s": round(timing.warmup_seconds, 3), "warmup_steps": timing.warmup,
           "seconds": round(time.perf_counter() - t0, 1), "notes": notes + timing.notes}
    del trainer
    free_device()
    return row


def render(rows: list[dict], device: torch.device, args) -> str:
    lines = [f"The trainer's step, batch {args.batch_size}, on {device_title(device)}, torch {torch.__version__}; "
             f"median of {args.windows} window(s) of up to {args.steps} step(s) after {args.warmup} untimed warm-up "
             f"step(s)" + (" [SMOKE: tiny models on the digits]" if args.smoke else ""), "",
             "| Model | Configuration | img/s (median) | min–max | Windows | Compile s | First step s | "
             "Warm-up s | Setup s | Notes |", "|---|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | — | — | — | — | — | — | — | FAILED: {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['config']} | {r['img_per_s']} | {r['min']}–{r['max']} | "
                         f"{r['windows']} | {r['compile_s']} | {r['first_step_s']} | {r['warmup_s']} | "
                         f"{r['setup_s']} | {'; '.join(r['notes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=3.0, help="per measurement, timed windows only")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the digits, short windows")
    parser.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per measurement")
    parser.add_argument("--out", type=Path, default=None, help="the markdown table, rewritten per measurement")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.warmup, args.windows, args.steps = 16, 2, 2, 3
    device = resolve_device(args.device)
    _timed_compile_probe()
    order = ([c for c in args.configs if not CONFIGS[c].get("train.compile")]
             + [c for c in args.configs if CONFIGS[c].get("train.compile")])
    rows = []
    for name in order:
        for model in args.models:
            try:
                row = measure(model, name, device, args)
            except Exception as e:  # noqa: BLE001 - one failure keeps the other measurements
                row = {"model": model, "config": name, "overrides": CONFIGS[name],
                       "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
                free_device()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if args.out:
                args.out.write_text(render(rows, device, args) + "\n")
    print(render(rows, device, args))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
