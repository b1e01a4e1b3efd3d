"""Training-step throughput of the GPU session's two models, ResNet-PreAct-20 and WRN-28-10
(batch 128, CIFAR size), in fp32 (IEEE), tf32, AMP fp16 and bf16, eager and with the speed path
(``torch.compile`` of the model), one JSON line per measurement as soon as it is measured.
``--speed step`` adds the capturable whole step (train.capturable_step: the lr a device tensor,
forward, backward and optimizer compiled as one function); not in the default session.

    python -m benchmarks.gpu_steps --device cuda --jsonl $OUT/steps.jsonl --max-seconds 4
    python -m benchmarks.gpu_steps --device cpu --smoke --jsonl /tmp/steps.jsonl   # seconds

Every eager measurement comes before any compiled one (compiling costs tens of seconds each),
so a session cut short still has the whole eager table. A measurement that fails is a line
with its error; the others go on.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imgclf import config
from imgclf.engine.precision import apply_backend_flags, backend_flags

from .common import device_title, resolve_device, time_windows
from .models import RECIPES, train_step

# name -> (family, its recipe's overrides; the smoke miniature's overrides)
MODELS = {
    "resnet_preact20": ("resnet_preact", {"depth": 20}, {"depth": 8, "initial_channels": 8}),
    "wrn28_10": ("wrn", {"depth": 28, "widening_factor": 10}, {"depth": 10, "widening_factor": 1,
                                                               "initial_channels": 8}),
}
PRECISIONS = ("fp32", "tf32", "amp", "bf16")


def measure(name: str, precision: str, speed: bool, device: torch.device, args, whole_step: bool = False) -> dict:
    family, full, smoke = MODELS[name]
    overrides = {f"model.{family}.{k}": v for k, v in (smoke if args.smoke else full).items()}
    cfg = config.build(RECIPES / f"{family}.yaml", overrides)
    # tf32 is fp32 storage with TF32 kernels: the same step as fp32 under another kernel policy.
    apply_backend_flags(backend_flags(precision, device.type, deterministic=False))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    step, model = train_step(cfg, device, batch_size=args.batch_size,
                             precision="fp32" if precision == "tf32" else precision,
                             compile_mode=args.compile_mode if speed else None, whole_step=whole_step)
    timing = time_windows(step, device, items=args.batch_size, warmup=args.warmup, windows=args.windows,
                          steps=args.steps, max_seconds=args.max_seconds)
    return {"model": name, "precision": precision, "speed_path": speed, "whole_step": whole_step,
            "batch": args.batch_size,
            "img_per_s": round(timing.median), "min": round(min(timing.rates)), "max": round(max(timing.rates)),
            "windows": timing.windows, "seconds": round(time.perf_counter() - t0, 1), "notes": timing.notes}


def _speed(r: dict) -> str:
    return "whole step" if r.get("whole_step") else "on" if r["speed_path"] else "off"


def render(rows: list[dict], device: torch.device, args) -> str:
    lines = [f"Training step, batch {args.batch_size}, channels_last, on {device_title(device)}, torch "
             f"{torch.__version__}; speed path = torch.compile(mode={args.compile_mode!r})"
             + (" [SMOKE: tiny models]" if args.smoke else ""), "",
             "| Model | Precision | Speed path | img/s (median) | min–max | Seconds (incl. compile) | Notes |",
             "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {_speed(r)} | — | — | — | "
                         f"FAILED: {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['precision']} | {_speed(r)} | "
                         f"{r['img_per_s']} | {r['min']}–{r['max']} | {r['seconds']} | {'; '.join(r['notes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--speed", nargs="+", default=["off", "on"], choices=["off", "on", "step"])
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                        help="torch.compile mode of the speed path")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=4.0, help="per measurement, compile excluded")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one short window")
    parser.add_argument("--jsonl", type=Path, default=None, help="append one JSON line per measurement")
    parser.add_argument("--out", type=Path, default=None, help="the markdown table")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.warmup, args.windows, args.steps = 16, 1, 1, 1
    device = resolve_device(args.device)
    rows = []
    for mode in args.speed:
        speed, whole_step = mode != "off", mode == "step"
        for name in args.models:
            for precision in args.precisions:
                try:
                    row = measure(name, precision, speed, device, args, whole_step)
                except Exception as e:  # noqa: BLE001 - one failure keeps the other measurements
                    row = {"model": name, "precision": precision, "speed_path": speed, "whole_step": whole_step,
                           "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if args.out:
                    args.out.write_text(render(rows, device, args) + "\n")
    apply_backend_flags(backend_flags("fp32", device.type, deterministic=False))
    print(render(rows, device, args))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
