"""Every performance number of imgclf in one run on the current device, into benchmarks/RESULTS.md.

    python -m benchmarks.run                         # full run on CUDA if present, else CPU
    python -m benchmarks.run --device cpu --max-seconds 15
    python -m benchmarks.run --smoke --out /tmp/r.md # tiny everything, seconds (what CI runs)

Measures, on one device:
  1. ResNet-PreAct-20 training step at batch 128: ours (fp32 NCHW, fp32 channels_last,
     low precision channels_last) against the plain reference (``benchmarks.plain``:
     torchvision per-sample transforms in DataLoader workers, NCHW fp32).
  2. End-to-end epoch of ResNet-PreAct-20, data included: the real engine (``Trainer``
     on a run directory) against the plain loop, in fp32 and in low precision.
  3. The data pipeline (DeviceLoader gather + TrainTransform) as % of the step.
  4. Training step of every family's seed recipe at the recipe's batch size, fp32 and
     the device's best precision, channels_last, beside the plain step where it fits.
  5. Snakemake's planning time (``benchmarks.planning``): ``snakemake --profile slurm -n all_tables``
     repeated, and every table alone.
Each device has one section of RESULTS.md; a run replaces its own device's section
and keeps the others. ``--smoke`` writes only where ``--out`` says (default: stdout).
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imgclf import catalog, config
from imgclf.augment.pipeline import TrainTransform
from imgclf.data import DeviceLoader

from . import epoch, models, plain, planning
from .common import (PeakMemory, Timing, best_precision, device_facts, device_title, load_average, mib,
                     native_cpu_bf16, resolve_device, seconds_per_call, time_windows)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
RECIPE = models.RECIPES / "resnet_preact.yaml"
SHARED_LOAD = 1.5  # load average above which the machine counts as shared (2-core CI machines)
TARGETS = {"e2e_low": 1.5, "e2e_fp32": 1.15, "pipeline_percent": 5.0}
PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast", "amp": "AMP fp16"}


@dataclass
class Settings:
    smoke: bool
    batch: int  # ResNet-PreAct-20's batch
    model: dict  # ResNet-PreAct-20's overrides
    warmup: int
    windows: int
    steps: int
    max_seconds: float | None
    e2e_seconds: float  # budget per end-to-end epoch measurement (sizes N)
    e2e_steps: tuple[int, int]  # (min, max) steps of an end-to-end measurement
    pipeline_reps: int

    @classmethod
    def make(cls, args) -> "Settings":
        if args.smoke:
            return cls(True, 32, {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8},
                       warmup=1, windows=1, steps=1, max_seconds=args.max_seconds, e2e_seconds=0,
                       e2e_steps=(3, 3), pipeline_reps=3)
        return cls(False, 128, {"model.resnet_preact.depth": 20}, warmup=args.warmup, windows=args.windows,
                   steps=args.steps, max_seconds=args.max_seconds, e2e_seconds=args.e2e_seconds,
                   e2e_steps=(3, 390), pipeline_reps=30)


def low_precision(device: torch.device) -> str:
    """The precision compared with fp32: the device's best, or bf16 where fp32 is best (to show why)."""
    best = best_precision(device)
    return best if best != "fp32" else "bf16"


def precision_label(device: torch.device, precision: str) -> str:
    label = PRECISION_NAMES[precision]
    if device.type == "cpu" and precision == "bf16" and not native_cpu_bf16():
        label += " (emulated: no native bf16)"
    return label


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "—"


def notes(timing: Timing | None) -> str:
    return "; ".join(timing.notes) if timing else ""


# ------------------------------------------------------------------ 1. the step
def plain_step(cfg: config.Config, data, device: torch.device, s: Settings, batch: int) -> tuple[Timing, int]:
    """The plain step, data loading included (persistent workers prefetching as in training)."""
    memory = PeakMemory(device)
    memory.reset()
    training = plain.PlainTraining(cfg, device)
    dataset = plain.InMemoryCIFAR(data.train_images, data.train_labels, plain.transform(data.mean, data.std))
    batches = plain.endless(plain.loader(dataset, batch, persistent=True))

    def step():
        x, y = next(batches)
        training.step(x, y)

    timing = time_windows(step, device, items=batch, warmup=s.warmup, windows=s.windows, steps=s.steps,
                          max_seconds=s.max_seconds)
    batches.close()  # frees the DataLoader: its persistent workers exit
    return timing, memory.read()


def step_section(device: torch.device, s: Settings, data) -> dict:
    cfg = config.build(RECIPE, s.model)
    rows = []
    timing, peak = plain_step(cfg, data, device, s, s.batch)
    rows.append({"what": "plain: DataLoader (2 workers, torchvision per-sample) + step", "layout": "NCHW",
                 "precision": "fp32", "timing": timing, "peak": peak, "data": True})
    variants = [("fp32", False), ("fp32", True), (low_precision(device), True)]
    for precision, channels_last in variants:
        memory = PeakMemory(device)
        memory.reset()
        torch.manual_seed(0)
        step, _ = models.train_step(cfg, device, batch_size=s.batch, precision=precision,
                                    channels_last=channels_last)
        timing = time_windows(step, device, items=s.batch, warmup=s.warmup, windows=s.windows, steps=s.steps,
                              max_seconds=s.max_seconds)
        rows.append({"what": "ours: model step (data resident, see the pipeline table)",
                     "layout": "channels_last" if channels_last else "NCHW", "precision": precision,
                     "timing": timing, "peak": memory.read(), "data": False})
    return {"cfg": cfg, "rows": rows}


# ------------------------------------------------------------------ 2. the epoch
def e2e_section(device: torch.device, s: Settings, data, step: dict, workdir: Path) -> dict:
    cfg = step["cfg"]
    plain_rate = step["rows"][0]["timing"].median
    rows = []
    for precision in ("fp32", low_precision(device)):
        ours_rate = next(r["timing"].median for r in step["rows"][1:]
                         if r["precision"] == precision and r["layout"] == "channels_last")
        # N from the slower side's rate, so the pair fits the budget; the same N for both.
        rate = min(plain_rate, ours_rate) if precision == "fp32" else ours_rate
        lo, hi = s.e2e_steps
        n_steps = max(lo, min(hi, int(s.e2e_seconds * rate / s.batch)))
        part = epoch.subset(data, n_steps * s.batch, 512 if not s.smoke else 64)
        # the plain loop: a fresh DataLoader per epoch (its workers start every epoch, as in a typical loop)
        memory = PeakMemory(device)
        memory.reset()
        training = plain.PlainTraining(cfg, device, precision)
        dataset = plain.InMemoryCIFAR(part.train_images, part.train_labels, plain.transform(part.mean, part.std))
        seconds, images = training.epoch(plain.loader(dataset, s.batch))
        plain_row = {"seconds": seconds, "images": images, "peak_bytes": memory.read()}
        ours_row = epoch.engine_epoch(part, workdir, recipe=RECIPE, model_overrides=s.model, precision=precision,
                                      batch_size=s.batch, device=device)
        for who, r in (("plain", plain_row), ("ours", ours_row)):
            rows.append({"who": who, "precision": precision, "images": r["images"], "seconds": r["seconds"],
                         "rate": r["images"] / r["seconds"], "peak": r["peak_bytes"],
                         "epoch": r["seconds"] * epoch.CIFAR_TRAIN_IMAGES / r["images"]})
    return {"rows": rows}


# ------------------------------------------------------------------ 3. the data pipeline
def pipeline_section(device: torch.device, s: Settings, data, step: dict) -> dict:
    cfg = step["cfg"]
    loader = DeviceLoader(data.train_images, data.train_labels, s.batch, shuffle=True, drop_last=True,
                          device=device)
    transform = TrainTransform(cfg.augmentation, *data.normalization, 10, 32, device)
    batches = loader.batches(0)
    _, images, labels = next(batches)
    g = torch.Generator(device=device).manual_seed(0)
    order = loader.order(0).to(device)[:s.batch]
    gather = seconds_per_call(lambda: (loader.images[order], loader.labels[order]), device, s.pipeline_reps, 2)
    augment = seconds_per_call(lambda: transform(images, labels, g), device, s.pipeline_reps, 2)
    # what a plain DataLoader worker spends on one batch (sequential, in this process)
    dataset = plain.InMemoryCIFAR(data.train_images, data.train_labels, plain.transform(data.mean, data.std))
    collate = torch.utils.data.default_collate
    reps = max(1, s.pipeline_reps // 10)
    plain_batch = seconds_per_call(lambda: collate([dataset[i] for i in range(s.batch)]), device, reps, 1)
    steps = {}
    for r in step["rows"][1:]:
        if r["layout"] == "channels_last":
            steps[r["precision"]] = s.batch / r["timing"].median
    return {"gather": gather, "augment": augment, "plain_batch": plain_batch, "steps": steps}


# ------------------------------------------------------------------ 4. the families
def families_section(device: torch.device, s: Settings, args, data) -> list[dict]:
    best = best_precision(device)
    rows = []
    for name in args.families:
        kw = dict(smoke=s.smoke, warmup=s.warmup, windows=s.windows, steps=s.steps, max_seconds=s.max_seconds,
                  batch_size=32 if s.smoke else None, memory_fraction=None if s.smoke else args.memory_fraction)
        row = {"fp32": models.benchmark(name, device, precision="fp32", **kw)}
        if best != "fp32":
            row["best"] = models.benchmark(name, device, precision=best, **kw)
        batch = row["fp32"]["batch"]
        step_seconds = batch / row["fp32"]["median"]
        # The plain step needs its own warm-up and windows: only where two of our steps fit the budget.
        if s.max_seconds is None or 2 * step_seconds <= s.max_seconds / 2:
            row["plain"], row["plain_peak"] = plain_step(models.recipe(name, s.smoke), data, device, s, batch)
        rows.append(row)
        print(f"  {name}: {row['fp32']['median']:.0f} img/s fp32", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------ 5. snakemake
def snakemake_section(args):
    """``snakemake --profile slurm -n all_tables`` repeated (one run in smoke mode), and in a full run every table alone."""
    all_tables = planning.measure("all_tables", 1 if args.smoke else args.plan_repeats, args.snakemake_timeout)
    each = [] if args.smoke else [planning.measure(f"results/tables/{name}.md", 1, args.snakemake_timeout)
                                  for name in planning.table_names()]
    return all_tables, each


# ------------------------------------------------------------------ rendering
def render(device: torch.device, s: Settings, meta: dict, step: dict, e2e: dict, pipe: dict, fams: list[dict],
           smk: dict | None) -> str:
    low = low_precision(device)
    best = best_precision(device)
    mem = PeakMemory(device).label
    out = [f"<!-- device: {meta['title']} -->", f"## {meta['title']}", ""]
    shared = meta["load_start"] > SHARED_LOAD
    out += [f"- Date: {meta['date']}; {', '.join(device_facts(device))}; data: {meta['data']}",
            f"- Load average (1 min) at start {meta['load_start']:.2f}, at end {meta['load_end']:.2f}"
            + (f": **the machine was shared with other work (> {SHARED_LOAD}); expect noise**" if shared else ""),
            f"- Run time {meta['wall']:.0f} s; command `{meta['command']}`",
            f"- Best precision of this device: {precision_label(device, best)}"
            + ("" if best != "fp32" or device.type != "cpu" else
               "; bf16 is measured anyway where asked, to show it does not pay here"),
            f"- Timing: {s.warmup} warm-up step(s), then the median of {s.windows} window(s) of {s.steps} step(s), "
            f"each synchronized" + (f"; at most about {s.max_seconds:g} s per measurement (--max-seconds), "
                                   "fewer windows/steps where marked" if s.max_seconds else ""),
            f"- Memory: {mem}"]
    if s.smoke:
        out.append("- **SMOKE RUN: tiny models, one window; proves the harness, not the speed**")
    out.append("")

    # targets
    e2e_rows = {(r["who"], r["precision"]): r for r in e2e["rows"]}
    r_fp32 = e2e_rows[("ours", "fp32")]["rate"] / e2e_rows[("plain", "fp32")]["rate"]
    r_low = e2e_rows[("ours", low)]["rate"] / e2e_rows[("plain", "fp32")]["rate"]
    r_best = e2e_rows[("ours", best)]["rate"] / e2e_rows[("plain", "fp32")]["rate"]
    aug_pct = {p: 100 * (pipe["augment"] + pipe["gather"]) / t for p, t in pipe["steps"].items()}
    worst_pct = max(aug_pct.values())

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out += ["### Targets", "", "| Target | Measured | Verdict |", "|---|---:|---|",
            f"| end-to-end epoch, ours in the best precision ({best}) vs plain fp32 ≥ {TARGETS['e2e_low']}× | "
            f"{r_best:.2f}× | {verdict(r_best >= TARGETS['e2e_low'])} |",
            f"| end-to-end epoch, ours fp32 vs plain fp32 ≥ {TARGETS['e2e_fp32']}× | {r_fp32:.2f}× | "
            f"{verdict(r_fp32 >= TARGETS['e2e_fp32'])} |"]
    if low != best:
        out.append(f"| (for reference) ours {precision_label(device, low)} vs plain fp32 | {r_low:.2f}× | — |")
    out += [f"| data pipeline < {TARGETS['pipeline_percent']:g} % of the step (worst precision) | "
            f"{worst_pct:.1f} % | {verdict(worst_pct < TARGETS['pipeline_percent'])} |", ""]
    if best == "fp32":
        out += ["The best-precision target assumes a low-precision speed-up; this device has none (bf16 is "
                "emulated), so its best precision is fp32 and both end-to-end targets compare fp32 with fp32.", ""]

    # 1. step
    plain_rate = step["rows"][0]["timing"].median
    name = "ResNet-PreAct-20" if not s.smoke else "ResNet-PreAct-8 (smoke)"
    out += [f"### Training step: {name}, batch {s.batch}", "",
            "| Path | Layout | Precision | img/s (median) | min–max | Windows×steps | vs plain | Peak MiB | Notes |",
            "|---|---|---|---:|---|---|---:|---:|---|"]
    for r in step["rows"]:
        t = r["timing"]
        out.append(f"| {r['what']} | {r['layout']} | {precision_label(device, r['precision'])} | {t.median:.0f} | "
                   f"{t.spread} | {t.windows} | {ratio(t.median, plain_rate)} | {mib(r['peak'])} | {notes(t)} |")
    out += ["", "Ours: the engine's model step (build_optimizer's foreach SGD, channels_last as the engine's "
            "default) on a resident batch; its data cost is in the pipeline table. Plain: data loading "
            "included, as a typical loop measures it.", ""]

    # 2. epoch
    out += [f"### End-to-end epoch: {name}, batch {s.batch}, data included", "",
            "| Loop | Precision | Images timed | Seconds | img/s | Epoch of 50,000 (extrapolated) | vs plain fp32 | "
            "vs plain same precision | Peak MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in e2e["rows"]:
        same = e2e_rows[("plain", r["precision"])]["rate"]
        who = ("ours: imgclf.engine.Trainer.fit, 1 epoch (its epoch_seconds)" if r["who"] == "ours" else
               "plain: fresh DataLoader (2 workers) + NCHW step")
        out.append(f"| {who} | {precision_label(device, r['precision'])} | {r['images']:,} | {r['seconds']:.1f} | "
                   f"{r['rate']:.0f} | {r['epoch']:.0f} s | {ratio(r['rate'], e2e_rows[('plain', 'fp32')]['rate'])} | "
                   f"{ratio(r['rate'], same)} | {mib(r['peak'])} |")
    out += ["", "Timed over the first N images (the same N for both loops of a precision; N sized to "
            "the time budget) and scaled linearly to 50,000 images. Ours excludes the evaluation and "
            "the checkpoint, as the plain loop does; the plain loop's worker start-up is inside its time.", ""]

    # 3. pipeline
    out += [f"### Data pipeline per batch of {s.batch}", "", "| Part | ms / batch | % of our step |",
            "|---|---:|---|"]

    def pct(sec: float) -> str:
        return ", ".join(f"{100 * sec / t:.2f} % ({p})" for p, t in pipe["steps"].items())

    out += [f"| DeviceLoader gather (resident uint8) | {1e3 * pipe['gather']:.2f} | {pct(pipe['gather'])} |",
            f"| TrainTransform (random crop + flip + normalize, batched) | {1e3 * pipe['augment']:.2f} | "
            f"{pct(pipe['augment'])} |",
            f"| *plain: per-sample torchvision transforms + collate, one process* | {1e3 * pipe['plain_batch']:.1f} | "
            f"{pct(pipe['plain_batch'])} (spread over the workers, on the same cores) |", ""]

    # 4. families
    best_label = precision_label(device, best)
    out += [f"### Training step of every family's seed recipe (channels_last; best precision: {best_label})", "",
            "| Family | Configuration | Batch | Params (M) | fp32 img/s | "
            + (f"{best} img/s | " if best != "fp32" else "")
            + "plain img/s (NCHW fp32, DataLoader) | ours/plain | Peak MiB (fp32) | Windows×steps | Notes |",
            "|---|---|---:|---:|---:|" + ("---:|" if best != "fp32" else "") + "---:|---:|---:|---|---|"]
    for row in fams:
        f = row["fp32"]
        ours = row.get("best", f)
        p = row.get("plain")
        cells = [f["name"], f["config"], str(f["batch"]), f"{f['params'] / 1e6:.2f}", f"{f['median']:.1f}"]
        if best != "fp32":
            cells.append(f"{row['best']['median']:.1f}")
        note = "; ".join(n for n in [notes(f["timing"]), notes(row.get("best", {}).get("timing")),
                                     "" if p else "plain not timed: over --max-seconds"] if n)
        cells += [f"{p.median:.1f}" if p else "—", ratio(ours["median"], p.median if p else None),
                  mib(f["peak_bytes"]), f["timing"].windows, note]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")

    # 5. snakemake
    if smk is not None:
        out += ["### Workflow planning (from the repo root)", "", planning.render(*smk)]
    out.append("<!-- end device -->")
    return "\n".join(out) + "\n"


HEADER = ("# Benchmarks\n\nWritten by `python -m benchmarks.run` (see its docstring). One section per device; "
          "a run replaces its own device's section and keeps the others.\n\n")


def merge(existing: str, section: str, title: str) -> str:
    """``existing`` with ``title``'s section replaced by ``section`` (appended when absent)."""
    if not existing.strip():
        return HEADER + section
    start = f"<!-- device: {title} -->"
    pattern = re.compile(re.escape(start) + r".*?<!-- end device -->\n?", re.DOTALL)
    if pattern.search(existing):
        return pattern.sub(lambda _: section, existing, count=1)
    return existing.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny models, one window: seconds; writes only --out")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"Markdown file to update (default {RESULTS.relative_to(REPO)}; smoke: stdout only)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="budget per measurement (default 20 on CPU, none on CUDA; smoke none)")
    parser.add_argument("--e2e-seconds", type=float, default=None,
                        help="budget that sizes each end-to-end epoch measurement (default 2x --max-seconds, "
                             "or a full 50,000-image epoch without one)")
    parser.add_argument("--data-root", default=None,
                        help="use the real CIFAR-10 prepared under this root (`imgclf data CIFAR10 --root ...`)")
    parser.add_argument("--families", nargs="+", default=list(catalog.model_names()),
                        choices=list(catalog.model_names()))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="CPU: a family's batch is halved while its estimated peak exceeds this share of the "
                             "available memory (the machine may be shared; 0 = never)")
    parser.add_argument("--no-snakemake", action="store_true", help="skip the workflow planning measurement")
    parser.add_argument("--snakemake-timeout", type=float, default=300)
    parser.add_argument("--plan-repeats", type=int, default=7, help="dry runs of all_tables (median reported)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.max_seconds is None and not args.smoke and device.type == "cpu":
        args.max_seconds = 20.0
    if args.e2e_seconds is None:
        args.e2e_seconds = 2 * args.max_seconds if args.max_seconds else float("inf")
    if args.windows < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--windows and --steps must be >= 1, --warmup >= 0")
    out_path = args.out if args.out is not None else (None if args.smoke else RESULTS)
    s = Settings.make(args)
    torch.backends.cudnn.benchmark = True
    meta = {"title": device_title(device), "load_start": load_average(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    n_data = 50_000 if not s.smoke else 256
    if args.data_root:
        data, meta["data"] = epoch.real_cifar(args.data_root), f"CIFAR-10 from {args.data_root}"
    else:
        data, meta["data"] = epoch.synthetic_cifar(n_data, 1000), "synthetic random uint8 3x32x32 (CIFAR size)"
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-") as tmp:
        say("training step: ResNet-PreAct-20, ours vs plain")
        step = step_section(device, s, data)
        say("data pipeline")
        pipe = pipeline_section(device, s, data, step)
        say("end-to-end epochs")
        e2e = e2e_section(device, s, data, step, Path(tmp))
        say("model families")
        fams = families_section(device, s, args, data)
    smk = None
    if not args.no_snakemake:
        say("snakemake -n all_tables")
        smk = snakemake_section(args)
    meta["load_end"] = load_average()
    meta["wall"] = time.perf_counter() - t0
    section = render(device, s, meta, step, e2e, pipe, fams, smk)
    print(section)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        existing = out_path.read_text() if out_path.is_file() else ""
        out_path.write_text(merge(existing, section, meta["title"]))
        say(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
