"""Job-to-result overhead of the slurm launcher: a trivial training job (digits, ResNet-PreAct-8,
1 epoch) through submitit + SLURM vs the same job in-process; needs a reachable controller.

    python -m benchmarks.slurm_overhead [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from imgclf import config as C, runs
from imgclf.launch import Resources, run

RECIPE = Path(__file__).resolve().parents[1] / "config" / "recipes" / "digits" / "resnet_preact.yaml"
TRIVIAL = {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8, "scheduler.epochs": 1,
           "train.batch_size": 128}


def once(launcher: str, root: Path, i: int) -> float:
    cfg = C.build(RECIPE, {**TRIVIAL, "train.seed": i})
    run_dir = runs.prepare(cfg, root / f"{launcher}{i}", resume=False)
    start = time.perf_counter()
    run(run_dir, launcher=launcher, resources=Resources(cpus_per_task=1, mem_gb=2, time_min=10), progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("IMGCLF_CACHE_DIR", tempfile.mkdtemp(prefix="imgclf-cache-"))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        once("debug", root, 99)  # warm the dataset cache and imports
        debug = [once("debug", root, i) for i in range(args.repeats)]
        slurm = [once("slurm", root, i) for i in range(args.repeats)]
    d, s = statistics.median(debug), statistics.median(slurm)
    print(f"| in-process (debug) | {d:.2f} s |\n| slurm launcher (sbatch -> result) | {s:.2f} s |\n"
          f"| overhead | {s - d:.2f} s |  (median of {args.repeats}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
