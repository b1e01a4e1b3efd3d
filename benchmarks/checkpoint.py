"""How long the trainer blocks per checkpoint, written synchronously vs by the background writer,
side by side in one run: a real Trainer of WRN-28-10 (the CIFAR recipe's model, ~36.5 M
parameters; on the digits so that no CIFAR copy is needed: the state is the same size), its SGD
momentum buffers filled, so the checkpoint holds what a training run's does (~290 MB).

    python -m benchmarks.checkpoint [--repeats 3] [--dir /path/on/the/filesystem/to/measure]

Per checkpoint: "blocks" is the time Trainer.save_checkpoint() keeps the training thread (and,
under DDP, every other rank waiting in its next collective); "on disk" the time until the file,
its sidecar and train_log.csv are written, fsynced and rotated. The first checkpoint of each mode
is left out of the median (it has no previous file to verify).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "config" / "recipes" / "digits" / "resnet_preact.yaml"
WRN28_10 = {"model.name": "wrn", "model.wrn.depth": 28, "model.wrn.widening_factor": 10,
            "model.wrn.initial_channels": 16, "train.batch_size": 128}


def trainer_for(run_dir: Path):
    import torch

    from imgclf import config as C, runs
    from imgclf.engine import Trainer

    cfg = C.build(RECIPE, WRN28_10)
    trainer = Trainer(runs.prepare(cfg, run_dir, resume=False), progress=False)
    for group in trainer.optimizer.param_groups:  # what the first optimizer step creates
        for p in group["params"]:
            trainer.optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    return trainer


def measure(trainer, background: bool, repeats: int) -> dict:
    from imgclf.engine import checkpoint as ckpt

    trainer.checkpoints.min_bytes = 0 if background else 1 << 62
    blocks, on_disk = [], []
    for i in range(repeats + 1):
        trainer.epoch = i
        start = time.perf_counter()
        trainer.save_checkpoint()
        blocked = time.perf_counter() - start
        trainer.checkpoints.wait()
        if i:  # the first one has no previous checkpoint to verify and rotate
            blocks.append(blocked)
            on_disk.append(time.perf_counter() - start)
    size = (trainer.run_dir / ckpt.LATEST).stat().st_size
    return {"blocks": statistics.median(blocks), "on_disk": statistics.median(on_disk), "bytes": size,
            "all_blocks": blocks}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None, help="where the run directory goes (default: a temp dir)")
    args = p.parse_args(argv)
    os.environ.setdefault("IMGCLF_CACHE_DIR", tempfile.mkdtemp(prefix="imgclf-cache-"))
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        trainer = trainer_for(Path(tmp) / "run")
        rows = {"synchronous (before)": measure(trainer, False, args.repeats),
                "background writer (after)": measure(trainer, True, args.repeats)}
    mb = next(iter(rows.values()))["bytes"] / 1e6
    print(f"WRN-28-10 checkpoint ({mb:.0f} MB), median of {args.repeats} (first left out); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| Write | Trainer blocks (s) | On disk after (s) | Each blocking (s) |\n|---|---:|---:|---|")
    for name, r in rows.items():
        each = ", ".join(f"{b:.2f}" for b in r["all_blocks"])
        print(f"| {name} | {r['blocks']:.2f} | {r['on_disk']:.2f} | {each} |")


if __name__ == "__main__":
    main()
