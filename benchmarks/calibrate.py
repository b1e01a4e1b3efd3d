"""How many training processes one GPU should run at once: the aggregate images per second of k
concurrent processes (k = 1, 2, 4), each running the trainer's own step loop (imgclf's Trainer,
the default path: no compile, no epoch buffer) for ResNet-PreAct-20 and ResNet-PreAct-56 in fp32
and AMP, batch 128, on CIFAR-10.

    python -m benchmarks.calibrate --device cuda --jsonl $OUT/calibration.jsonl --out $OUT/calibration.md
    python -m benchmarks.calibrate --device cpu --smoke --k 1 2           # digits, tiny models

For each k, k worker processes are started once and measure every (model, precision) in turn:
build the Trainer, run untimed warm-up steps, wait for the other workers at a barrier (so the k
timed stretches overlap), then time ``--steps`` steps. ``img_per_s`` sums the k workers' own
rates; ``wall_img_per_s`` is every image over the span from the first start to the last end
(lower when the workers do not finish together). A worker that fails or a k that runs past
``--k-timeout`` is recorded and the next k runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet_preact20", "resnet_preact56")
PRECISIONS = ("fp32", "amp")
BARRIER_TIMEOUT_S = 300


def _barrier(folder: Path, name: str, index: int, k: int) -> None:
    (folder / f"{name}.ready.{index}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(folder.glob(f"{name}.ready.*"))) < k:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other workers did not arrive within {BARRIER_TIMEOUT_S} s")
        time.sleep(0.01)


def worker(args) -> int:
    """One of k processes: every (model, precision), each timed after the barrier."""
    import torch

    from .common import resolve_device, sync
    from .trainer_steps import build_config, build_trainer, free_device, step_loop

    device = resolve_device(args.device)
    folder = Path(args.sync)
    for model in args.models:
        for precision in args.precisions:
            name = f"{model}.{precision}"
            cfg = build_config(model, {"train.precision": precision}, smoke=args.smoke,
                               batch_size=args.batch_size, device=str(device))
            trainer = build_trainer(cfg)
            step = step_loop(trainer)
            for _ in range(max(args.warmup, 1)):
                step()
            sync(device)
            _barrier(folder, name, args.index, args.k)
            start = time.time()  # wall clock: comparable across the workers
            for _ in range(args.steps):
                step()
            sync(device)
            end = time.time()
            result = {"name": name, "index": args.index, "start": start, "end": end,
                      "img_per_s": args.steps * args.batch_size / (end - start)}
            (folder / f"{name}.result.{args.index}.json").write_text(json.dumps(result))
            del trainer, step
            free_device()
            torch.manual_seed(0)
    return 0


def aggregate(folder: Path, model: str, precision: str, k: int, args) -> dict:
    name = f"{model}.{precision}"
    results = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{name}.result.*.json"))]
    row = {"model": model, "precision": precision, "k": k, "batch": args.batch_size, "steps": args.steps,
           "warmup": args.warmup}
    if len(results) < k:
        return {**row, "error": f"{len(results)} of {k} workers finished"}
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {**row, "img_per_s": round(sum(r["img_per_s"] for r in results)),
            "wall_img_per_s": round(k * args.steps * args.batch_size / span),
            "per_process": [round(r["img_per_s"]) for r in results]}


def run_k(k: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix=f"imgclf-calibrate-k{k}-") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.calibrate", "--worker", "--sync", tmp, "--k", str(k),
               "--device", args.device, "--models", *args.models, "--precisions", *args.precisions,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--smoke"] if args.smoke else []
        procs = [subprocess.Popen(cmd + ["--index", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for i in range(k)]
        failure = None
        deadline = time.monotonic() + args.k_timeout
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                failure = f"k={k}: past --k-timeout {args.k_timeout:g} s"
                break
            if p.returncode:
                tail = (out or "").strip().splitlines()[-1:] or [""]
                failure = failure or f"worker {i} failed (rc {p.returncode}): {tail[0][:200]}"
        rows = [aggregate(Path(tmp), m, pr, k, args) for m in args.models for pr in args.precisions]
    if failure:
        for row in rows:
            if "error" in row:
                row["error"] += f"; {failure}"
    return rows


def render(rows: list[dict], args) -> str:
    lines = [f"k concurrent training processes on one {args.device} device, the trainer's default step loop, "
             f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up step(s) each"
             + (" [SMOKE: tiny models on the digits]" if args.smoke else ""), "",
             "| Model | Precision | k | Aggregate img/s (sum) | Aggregate img/s (wall) | Per process | vs k=1 |",
             "|---|---|---:|---:|---:|---|---:|"]
    single = {(r["model"], r["precision"]): r.get("img_per_s") for r in rows if r["k"] == 1}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | {r['k']} | — | — | — | FAILED: {r['error']} |")
            continue
        base = single.get((r["model"], r["precision"]))
        ratio = f"{r['img_per_s'] / base:.2f}×" if base else "—"
        lines.append(f"| {r['model']} | {r['precision']} | {r['k']} | {r['img_per_s']} | {r['wall_img_per_s']} | "
                     f"{', '.join(map(str, r['per_process']))} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=["fp32", "tf32", "amp", "bf16"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 60; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; smoke 2)")
    p.add_argument("--k-timeout", type=float, default=120.0, help="seconds for all configurations of one k")
    p.add_argument("--smoke", action="store_true", help="tiny models on the digits")
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sync", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size = 16 if args.batch_size == 128 else args.batch_size
    args.steps = args.steps or (3 if args.smoke else 60)
    args.warmup = args.warmup or (2 if args.smoke else 10)
    if args.worker:
        args.k = args.k[0]
        return worker(args)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    rows = []
    for k in args.k:
        new = run_k(k, args)
        rows += new
        for row in new:
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if args.out:
            args.out.write_text(render(rows, args) + "\n")
    print(render(rows, args))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
