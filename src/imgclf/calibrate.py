"""``imgclf calibrate``: the aggregate images per second of k concurrent training processes on one
device (k = 1, 2, 4 by default) for each model and precision, written to the calibration file that
the plan turns into GPU-hours (:mod:`imgclf.cost`).

Each process runs the trainer's own step loop (imgclf's Trainer built from the recipe, the default
path) on the real training data. For each k, k worker processes are started once and measure every
(model, precision) in turn: build the Trainer, meet the others at a barrier, run untimed warm-up
steps together (compilation, cuDNN's algorithm search and the allocator are paid there, under the
same contention as the timed stretch), agree on a step count that fits ``--max-seconds`` at the
slowest worker's warm-up pace, meet again, and time those steps. The aggregate is every image of
the k workers over the span from the first start to the last end: what a job packing k seeds gets,
since it ends with its slowest seed.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.utils import InputError, clip

DEFAULT_MODELS = ("resnet_preact-20", "resnet_preact-56", "wrn-28-10@64", "shake_shake-26,initial_channels=96@64")
PRECISIONS = ("fp32", "tf32", "amp", "bf16", "fp16")  # train.precision values (fp16 needs CUDA)
BARRIER_TIMEOUT_S = 300
# A model spec: family-depth[-widening_factor][,key=value...][@batch]
_SPEC = re.compile(r"(?P<family>[a-z_]+)(?:-(?P<depth>\d{1,4})(?:-(?P<widen>\d{1,3}))?)?"
                   r"(?P<keys>(?:,[a-z_]+=[A-Za-z0-9_.]+)*)(?:@(?P<batch>\d{1,5}))?")
SPEC_HELP = ("family-depth[-widening_factor][,key=value...][@batch], e.g. resnet_preact-20, wrn-28-10@64, "
             "shake_shake-26,initial_channels=96@64")


@dataclass(frozen=True)
class ModelSpec:
    text: str
    family: str
    overrides: dict[str, Any]  # model.<family>.<key> -> value
    batch_size: int | None


def parse_spec(text: str) -> ModelSpec:
    import yaml

    from imgclf import catalog

    m = _SPEC.fullmatch(text)
    if not m:
        raise InputError(f"--models: {clip(text)} is not a model spec ({SPEC_HELP})")
    family = m["family"]
    if family not in catalog.model_names():
        raise InputError(f"--models: {clip(text)}: unknown model {family!r} "
                         f"(known: {', '.join(catalog.model_names())})")
    overrides: dict[str, Any] = {}
    if m["depth"]:
        overrides["depth"] = int(m["depth"])
    if m["widen"]:
        overrides["widening_factor"] = int(m["widen"])
    for pair in filter(None, m["keys"].split(",")):
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    return ModelSpec(text, family, overrides, int(m["batch"]) if m["batch"] else None)


def build_config(spec: ModelSpec, precision: str, recipes: Path, batch_size: int, device: str):
    from imgclf import config as C

    recipe = recipes / f"{spec.family}.yaml"
    if not recipe.is_file():
        raise InputError(f"--models: {spec.text}: no recipe {recipe} (each model needs <recipes>/<family>.yaml)")
    keys = {f"model.{spec.family}.{k}": v for k, v in spec.overrides.items()}
    # Many epochs: the schedule never runs out however many steps are timed.
    return C.build(recipe, {"model.name": spec.family, **keys, "train.batch_size": spec.batch_size or batch_size,
                            "train.precision": precision, "scheduler.epochs": 200, "device": device})


# --------------------------------------------------------------------------- one worker process
def _load_once() -> None:
    """The dataset is read once per process, not once per trainer: loading is no part of a step."""
    from imgclf.engine import trainer as engine

    if hasattr(engine, "load_data") and not hasattr(engine.load_data, "cache_info"):
        engine.load_data = functools.lru_cache(maxsize=2)(engine.load_data)


def step_loop(trainer):
    """One call, one training step as the trainer's epoch loop runs it (its batch source, the
    per-(seed, epoch, step) reseed, its step function), epoch after epoch. The trainer's per-epoch
    work (checkpoint, log, evaluation) is left out: it is not a step.

    ``IMGCLF_BENCH_FIRST_STEP_DELAY`` (seconds) makes the first step that much slower, as a long
    compile would: a test shows that the rate measured is the steady state's."""
    import torch

    from imgclf.data import derive_seed

    def batches():
        while True:
            yield from trainer.batches.epoch(trainer.epoch, trainer.step_in_epoch)
            trainer.epoch += 1
            trainer.step_in_epoch = 0

    source = batches()
    delay = [float(os.environ.get("IMGCLF_BENCH_FIRST_STEP_DELAY", "0") or 0)]

    def step() -> None:
        index, make_batch = next(source)
        torch.manual_seed(derive_seed(trainer.cfg.train.seed, trainer.epoch, index))
        trainer.step(make_batch())
        trainer.step_in_epoch = index + 1
        if delay[0]:
            time.sleep(delay[0])
            delay[0] = 0.0

    return step


def _barrier(folder: Path, name: str, index: int, k: int) -> None:
    (folder / f"{name}.{index}").touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(folder.glob(f"{name}.*"))) < k:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: the other workers did not arrive within {BARRIER_TIMEOUT_S} s")
        time.sleep(0.01)


def worker(job: dict[str, Any]) -> int:
    import torch

    from imgclf import runs
    from imgclf.engine import Trainer

    device = torch.device(job["device"])
    folder, index, k = Path(job["sync"]), job["index"], job["k"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    _load_once()
    for n, (spec_text, precision) in enumerate(job["configs"]):
        spec = parse_spec(spec_text)
        cfg = build_config(spec, precision, Path(job["recipes"]), job["batch_size"], job["device"])
        run_dir = Path(tempfile.mkdtemp(prefix=f"w{index}-", dir=folder))
        trainer = Trainer(runs.prepare(cfg, run_dir, resume=False), progress=False)
        step = step_loop(trainer)
        _barrier(folder, f"{n}.warm", index, k)
        t0 = time.perf_counter()
        for _ in range(job["warmup"]):
            step()
        sync()
        # the pace of the second half of the warm-up (the first steps pay for compilation)
        half = max(job["warmup"] // 2, 1)
        t1 = time.perf_counter()
        for _ in range(half):
            step()
        sync()
        pace = (time.perf_counter() - t1) / half
        (folder / f"{n}.pace.{index}.json").write_text(json.dumps({"pace": pace, "warmup_s": t1 - t0}), encoding="utf-8")
        _barrier(folder, f"{n}.timed", index, k)
        slowest = max(json.loads(p.read_text(encoding="utf-8"))["pace"] for p in folder.glob(f"{n}.pace.*.json"))
        steps = max(1, min(job["steps"], math.floor(job["max_seconds"] / max(slowest, 1e-9))))
        start = time.time()  # wall clock: comparable across the workers
        for _ in range(steps):
            step()
        sync()
        end = time.time()
        batch = cfg.train.batch_size
        (folder / f"{n}.result.{index}.json").write_text(json.dumps(
            {"start": start, "end": end, "steps": steps, "batch_size": batch,
             "img_per_s": steps * batch / (end - start), "model_config": cfg.to_dict()["model"][spec.family],
             "dataset": cfg.dataset.name}), encoding="utf-8")
        del trainer, step
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


# --------------------------------------------------------------------------- k workers
def _aggregate(folder: Path, n: int, spec: str, precision: str, k: int, args) -> dict[str, Any]:
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob(f"{n}.result.*.json"))]
    row: dict[str, Any] = {"model": spec, "precision": precision, "k": k, "warmup": args.warmup}
    if len(results) < k:
        return {**row, "error": f"{len(results)} of {k} workers finished"}
    first = results[0]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    images = sum(r["steps"] * r["batch_size"] for r in results)
    return {**row, "batch": first["batch_size"], "steps": first["steps"], "dataset": first["dataset"],
            "model_config": first["model_config"], "img_per_s": round(sum(r["img_per_s"] for r in results), 1),
            "wall_img_per_s": round(images / span, 1), "per_process": [round(r["img_per_s"], 1) for r in results]}


def run_k(k: int, args) -> list[dict[str, Any]]:
    configs = [(m, p) for m in args.models for p in args.precisions]
    with tempfile.TemporaryDirectory(prefix=f"imgclf-calibrate-k{k}-") as tmp:
        job = {"sync": tmp, "k": k, "device": args.device, "configs": configs, "recipes": str(args.recipes),
               "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
               "max_seconds": args.max_seconds}
        procs = []
        for i in range(k):
            spec = json.dumps({**job, "index": i})
            procs.append(subprocess.Popen([sys.executable, "-m", "imgclf.calibrate", spec], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        failure = None
        deadline = time.monotonic() + args.k_timeout
        for i, p in enumerate(procs):
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                    q.wait()
                failure = f"k={k}: past --k-timeout {args.k_timeout:g} s"
                break
            if p.returncode:
                tail = (out or "").strip().splitlines()[-1:] or [""]
                failure = failure or f"worker {i} failed (rc {p.returncode}): {tail[0][:300]}"
        rows = [_aggregate(Path(tmp), n, m, pr, k, args) for n, (m, pr) in enumerate(configs)]
    for row in rows:
        if "error" in row and failure:
            row["error"] += f"; {failure}"
    return rows


def render(rows: list[dict[str, Any]], args) -> str:
    lines = [f"k concurrent training processes on one {args.device_name}, the trainer's default step loop, "
             f"up to {args.steps} timed steps ({args.max_seconds:g} s) after {args.warmup} + {max(args.warmup // 2, 1)}"
             " untimed warm-up steps", "",
             "| Model | Precision | Batch | k | Aggregate img/s | Per process | vs k=1 |",
             "|---|---|---:|---:|---:|---|---:|"]
    single = {(r["model"], r["precision"]): r.get("wall_img_per_s") for r in rows if r["k"] == 1}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | | {r['k']} | — | — | FAILED: {r['error']} |")
            continue
        base = single.get((r["model"], r["precision"]))
        ratio = f"{r['wall_img_per_s'] / base:.2f}×" if base else "—"
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['k']} | {r['wall_img_per_s']:,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in r['per_process'])} | {ratio} |")
    return "\n".join(lines)


def _merge(path: Path, device: str, torch_version: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This run's entries, plus the file's entries of other configurations when the file is this
    device's and this torch's: calibrating one more model keeps the others."""
    from imgclf.cost import load_calibration

    try:
        old = load_calibration(path)
    except InputError:
        return entries
    if old is None or old.device != device or old.torch != torch_version:
        return entries

    def key(e):
        return (e["dataset"], e["model"], json.dumps(e["model_config"], sort_keys=True), e["batch_size"],
                e["precision"], e["k"])

    new = {key(e) for e in entries}
    return [e for e in old.entries if key(e) not in new] + entries


def calibrate(args) -> int:
    import torch

    from imgclf.cost import write_calibration

    device = torch.device(args.device)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[dict[str, Any]] = []
    for k in args.k:
        new = run_k(k, args)
        rows += new
        for row in new:
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
        if args.markdown:
            from imgclf.utils import atomic_write_text

            atomic_write_text(args.markdown, render(rows, args) + "\n")
    entries = [{"dataset": r["dataset"], "model": parse_spec(r["model"]).family, "model_config": r["model_config"],
                "batch_size": r["batch"], "precision": r["precision"], "k": r["k"], "img_s": r["wall_img_per_s"],
                "spec": r["model"], "steps": r["steps"], "per_process": r["per_process"]}
               for r in rows if "error" not in r]
    device_name = args.device_name if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    if entries:
        write_calibration(args.output, device=device_name, torch_version=torch.__version__,
                          date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          steps=args.steps, warmup=args.warmup,
                          entries=_merge(args.output, device_name, torch.__version__, entries))
    print(render(rows, args))
    failed = [r for r in rows if "error" in r]
    print(f"imgclf calibrate: {len(entries)} measurement(s) written to {args.output}"
          + (f"; {len(failed)} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="the device to measure (cuda, cuda:1, cpu)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp"], metavar="P",
                   help=f"train.precision values ({', '.join(PRECISIONS)})")
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 4], help="concurrent processes (1 to 64)")
    p.add_argument("--recipes", type=Path, default=Path("config/recipes/cifar"),
                   help="the folder of <family>.yaml recipes (its dataset is the one measured)")
    p.add_argument("--batch-size", type=int, default=128, help="for specs without @batch")
    p.add_argument("--steps", type=int, default=300, help="timed steps per process, at most")
    p.add_argument("--max-seconds", type=float, default=20.0, help="timed seconds per measurement, at most")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (then half as many to pace)")
    p.add_argument("--k-timeout", type=float, default=900.0, help="seconds for all measurements of one k")
    p.add_argument("--output", type=Path, default=Path("config/calibration.json"))
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--jsonl", type=Path, default=None, help="also append one JSON line per measurement here")


def check_arguments(args) -> None:
    """One-line errors for bad options, before any process starts."""
    import torch

    if len(set(args.k)) != len(args.k) or not all(1 <= k <= 64 for k in args.k):
        raise InputError(f"--k: {' '.join(map(str, args.k))}: expected distinct whole numbers in [1, 64]")
    bad = [p for p in args.precisions if p not in PRECISIONS]
    if bad:
        raise InputError(f"--precisions: {clip(bad[0])} is not one of {', '.join(PRECISIONS)}")
    for name, low in (("steps", 1), ("warmup", 1), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')}: {getattr(args, name)} is out of range (at least {low})")
    for name in ("max_seconds", "k_timeout"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise InputError(f"--{name.replace('_', '-')}: {value:g} is out of range (a positive number of seconds)")
    from imgclf import config as C

    for spec in map(parse_spec, args.models):
        if not (args.recipes / f"{spec.family}.yaml").is_file():
            raise InputError(f"--models: {spec.text}: no recipe {args.recipes / (spec.family + '.yaml')} "
                             f"(--recipes names the folder of <family>.yaml recipes)")
        try:  # every configuration resolves here, not in k worker processes
            for precision in args.precisions:
                build_config(spec, precision, args.recipes, args.batch_size, "cpu")
        except C.ConfigError as e:
            raise InputError(f"--models: {spec.text}: {e}") from None
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device: {clip(args.device)} is not a device (cuda, cuda:N, cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device: {clip(args.device)}: only cuda and cpu are calibrated")
    if device.type == "cpu" and "fp16" in args.precisions:
        raise InputError("--precisions: fp16 needs a CUDA device (use fp32 or bf16 on cpu)")
    if args.output.parent and not args.output.parent.is_dir():
        raise InputError(f"--output: {args.output}: the folder {args.output.parent} does not exist")


if __name__ == "__main__":  # one worker: python -m imgclf.calibrate '<job as JSON>'
    raise SystemExit(worker(json.loads(sys.argv[1])))
