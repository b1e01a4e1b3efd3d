"""Fidelity on real data: the reference implementation and imgclf, trained on the same table row,
the same real images and the same short schedule, k seeds each; both test-error distributions
side by side with a two-sample test (written to benchmarks/FIDELITY.md).

    python -m benchmarks.fidelity                 # the full run (about 10-15 min on 2 CPU cores)
    python -m benchmarks.fidelity --smoke --out /tmp/F.md   # seconds: tiny model, 2 seeds (CI)

Each row is a table row (config/tables/<table>.yaml): its recipe and overrides configure both
sides, with only the schedule shortened (``scheduler.epochs``) and, for CPU time, a fixed
subset of the training and test images, the same for every seed and both sides.

- The reference (../shared/reference, imported at run time as tests/fidelity/oracle.py does;
  none of its code is copied here) is driven through its own factories: ``create_model``,
  ``create_optimizer``, ``create_scheduler``, ``create_loss``, ``create_transform`` (its
  per-sample PIL/numpy transforms) and ``create_collator`` (mixup / RICAP / CutMix), in a small
  loop shaped like its train.py (shuffled batches, drop_last, one scheduler step per batch).
  fp32 only: apex is never imported.
- imgclf runs through its engine (``imgclf.engine.train``) on a cache holding the same subset.

The test: an exact two-sided permutation test of the difference of the mean test errors (all
C(2k, k) splits of the 2k errors), plus Welch's t statistic. With k = 3 the smallest attainable
p-value is 0.1: the test can reveal a gross difference, not a subtle one; the mean difference
is shown beside the seed-to-seed spread for that reason.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "config" / "recipes"
TABLES = REPO / "config" / "tables"
CIFAR_ARCHIVE = "cifar10_jpg/cifar10_jpg.tgz"
NOTES = "## Notes\n"  # a section of the output file that a new run keeps


@dataclass(frozen=True)
class Row:
    key: str
    table: str  # config/tables/<table>.yaml
    row_id: str
    ref_files: tuple[str, ...]  # the reference's configs/ files that hold the same recipe, merged in order


# The reference has no MNIST recipe: its README trains the CIFAR recipe with the dataset config on top.
_REF_CIFAR = ("cifar/resnet_preact.yaml",)
_REF_MNIST = ("cifar/resnet_preact.yaml", "datasets/mnist.yaml")
ROWS = {
    "mnist_rp20": Row("mnist_rp20", "mnist", "rp20", _REF_MNIST),
    "mnist_rp20_mixup": Row("mnist_rp20_mixup", "mnist", "rp20_mixup_alpha1", _REF_MNIST),
    "cifar10_rp20": Row("cifar10_rp20", "label_smoothing_mixup_ricap", "rp20_200ep", _REF_CIFAR),
    "cifar10_rp20_mixup": Row("cifar10_rp20_mixup", "label_smoothing_mixup_ricap", "rp20_mixup_200ep", _REF_CIFAR),
}
FULL_ROWS = ["mnist_rp20", "cifar10_rp20", "cifar10_rp20_mixup"]
SMOKE_ROWS = ["mnist_rp20", "mnist_rp20_mixup"]
# Smoke: a depth-8, width-4 ResNet-PreAct (the rows' architecture family), seconds per run.
SMOKE_MODEL = {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 4}


def table_row(row: Row) -> tuple[str, dict]:
    spec = yaml.safe_load((TABLES / f"{row.table}.yaml").read_text())
    for r in spec["rows"]:
        if r["id"] == row.row_id:
            return r["recipe"], dict(r.get("overrides") or {})
    raise SystemExit(f"{TABLES / row.table}.yaml: no row '{row.row_id}'")


# ---------------------------------------------------------------- data (the same subset for both sides)
@dataclass
class Subset:
    name: str  # imgclf's dataset name
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    full: object  # imgclf.data.Data of the whole dataset (classes, mean, std)


def load_subset(dataset: str, data_root: Path, work: Path, n_train: int, n_test: int) -> Subset:
    """A fixed random subset (generator seed 0, independent of the run seeds) of the real data,
    read through imgclf's readers (the JPEG CIFAR-10 copy is unpacked once into ``work``)."""
    from imgclf.data import datasets

    os.environ["IMGCLF_CACHE_DIR"] = str(work / "cache")
    if dataset == "CIFAR10":
        target = work / "data"
        if (target / "cifar10").is_dir() or datasets.cache_path("CIFAR10").is_file():
            data = datasets.load("CIFAR10", root=target)
        else:
            data = datasets.prepare("CIFAR10", root=target, source=data_root / CIFAR_ARCHIVE)
    else:
        data = datasets.load(dataset, root=data_root)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(data.train_labels), generator=g)[:n_train]
    te = torch.randperm(len(data.test_labels), generator=g)[:n_test]
    return Subset(data.name, data.train_images[tr].clone(), data.train_labels[tr].clone(),
                  data.test_images[te].clone(), data.test_labels[te].clone(), data)


# ---------------------------------------------------------------- the reference, driven by its factories
def reference_config(ref, files: tuple[str, ...], options: dict):
    """Built as its train.py builds it: defaults, config files, KEY VALUE options, update_config."""
    from oracle import REFERENCE_DIR

    cfg = ref.get_default_config()
    for name in files:
        cfg.merge_from_file(str(REFERENCE_DIR / "configs" / name))
    items: list = []
    for key, value in {**options, "device": "cpu", "train.dataloader.pin_memory": False}.items():
        items += [key, value]
    cfg.merge_from_list(items)
    cfg = ref.update_config(cfg)
    cfg.freeze()
    return cfg


def _pil(images: torch.Tensor) -> list:
    import PIL.Image

    arr = images.permute(0, 2, 3, 1).numpy()
    if arr.shape[-1] == 1:
        return [PIL.Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [PIL.Image.fromarray(a, mode="RGB") for a in arr]


def train_reference(ref, cfg, data: Subset) -> float:
    """Its train.py's loop on our subset: test error (%) after the last epoch."""
    from pytorch_image_classification.utils import set_seed

    set_seed(cfg)
    model = ref.create_model(cfg)
    optimizer = ref.create_optimizer(cfg, model)
    batch = cfg.train.batch_size
    steps = len(data.train_labels) // batch  # its loader drops the last partial batch
    scheduler = ref.create_scheduler(cfg, optimizer, steps_per_epoch=steps)
    train_loss, _ = ref.create_loss(cfg)
    train_tf, test_tf = ref.create_transform(cfg, is_train=True), ref.create_transform(cfg, is_train=False)
    collate = ref.create_collator(cfg)
    images, labels = _pil(data.train_images), data.train_labels.tolist()
    for _ in range(cfg.scheduler.epochs):
        model.train()
        order = torch.randperm(len(labels)).tolist()  # RandomSampler: the global torch generator
        for s in range(steps):
            idx = order[s * batch:(s + 1) * batch]
            x, targets = collate([(train_tf(images[i]), labels[i]) for i in idx])
            optimizer.zero_grad()
            loss = train_loss(model(x), targets)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    test = torch.stack([test_tf(im) for im in _pil(data.test_images)])
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(test), 500):
            wrong += int((model(test[i:i + 500]).argmax(1) != data.test_labels[i:i + 500]).sum())
    return 100.0 * wrong / len(test)


# ---------------------------------------------------------------- imgclf, through its engine
def train_imgclf(recipe: str, overrides: dict, data: Subset, work: Path) -> float:
    from imgclf import config as C, runs
    from imgclf.data import datasets
    from imgclf.engine import train

    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
    os.environ["IMGCLF_CACHE_DIR"] = str(cache)
    full = data.full
    # The whole dataset's classes and normalisation constants, as a run on all of it would use.
    sub = datasets.Data(full.name, data.train_images, data.train_labels, data.test_images, data.test_labels,
                        full.classes, full.mean, full.std)
    datasets._write_cache(datasets.cache_path(data.name), sub, "builtin")
    cfg = C.build(RECIPES / recipe, {**overrides, "device": "cpu", "data_root": str(work / "no-data"),
                                     "train.checkpoint_period": overrides["scheduler.epochs"]})
    run = runs.prepare(cfg, Path(tempfile.mkdtemp(prefix="run-", dir=work)), resume=False)
    result = train(run, resume=False, progress=False)
    return float(result["test_error"])


# ---------------------------------------------------------------- statistics
def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation p-value of |mean(a) - mean(b)| over all splits."""
    pooled = np.array(a + b, dtype=float)
    observed = abs(np.mean(a) - np.mean(b))
    n, hits, total = len(a), 0, 0
    for idx in itertools.combinations(range(len(pooled)), n):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(idx)] = True
        total += 1
        hits += abs(pooled[mask].mean() - pooled[~mask].mean()) >= observed - 1e-12
    return hits / total


def welch_t(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 0.0 if statistics.mean(a) == statistics.mean(b) else math.inf
    return (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)


# ---------------------------------------------------------------- report
def describe(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def report(results: list[dict], settings: dict, smoke: bool) -> str:
    import torchvision

    lines = ["# Fidelity on real data: the reference implementation vs imgclf", "",
             "Written by `python -m benchmarks.fidelity` (see its docstring). Each row is a table row of",
             "config/tables/, trained by the reference code (../shared/reference, through its own factories)",
             "and by imgclf (its engine) on the same real images and the same shortened schedule, one run",
             "per seed. Test error in % on a fixed test subset: mean ± std over seeds, then every seed.", ""]
    if smoke:
        lines += ["**SMOKE RUN** (tiny model, tiny subsets): checks the harness, not fidelity.", ""]
    lines += [f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command `{settings['command']}`",
              f"- Hardware: {settings['cpu']}, {os.cpu_count()} cores (shared with other jobs; "
              f"load average at start {settings['load_start']:.2f}, at end {settings['load_end']:.2f}); "
              f"{torch.get_num_threads()} torch thread(s); fp32 on CPU",
              f"- Software: imgclf at commit {settings['commit']}; Python {platform.python_version()}, "
              f"torch {torch.__version__}, torchvision {torchvision.__version__}; the reference at commit "
              "993089a (ORACLE.md)",
              f"- Seeds: {settings['seeds']} (train.seed, on both sides); wall time {settings['seconds']:.0f} s", ""]
    lines += ["| Row (table: id) | Dataset | Train / test images | Epochs | Reference | imgclf | Δ mean "
              "(imgclf − ref) | Permutation p | Welch t |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['label']} (`{r['table']}: {r['row_id']}`) | {r['dataset']} | "
                     f"{r['n_train']:,} / {r['n_test']:,} | {r['epochs']} | {describe(r['reference'])} | "
                     f"{describe(r['imgclf'])} | {statistics.mean(r['imgclf']) - statistics.mean(r['reference']):+.2f} | "
                     f"{r['p']:.2f} | {r['t']:+.2f} |")
    lines += ["", "Per seed (test error %):", ""]
    for r in results:
        lines.append(f"- {r['label']} (`{r['table']}: {r['row_id']}`): reference "
                     f"{', '.join(f'{x:.2f}' for x in r['reference'])}; imgclf "
                     f"{', '.join(f'{x:.2f}' for x in r['imgclf'])}; overrides beyond the row: "
                     f"`{r['extra']}`; {r['seconds_ref']:.0f} s reference, {r['seconds_ours']:.0f} s imgclf")
    lines += ["", "Both sides' runs are a pure function of (row, seed); the two implementations draw "
              "different random numbers (weight init, shuffling, augmentation), so single runs differ and only "
              "the distributions are compared.", ""]
    return "\n".join(lines)


def git_commit() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny MNIST subset, 2 seeds: seconds")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=None)
    parser.add_argument("--seeds", type=int, default=None, help="k seeds per side (default 3; smoke 2)")
    parser.add_argument("--epochs", type=int, default=None, help="the shortened schedule (default 2; smoke 1)")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default 4096; smoke 256)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default 2000; smoke 256)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("IMGCLF_TEST_DATA_ROOT") or REPO.parent / "shared" / "data"))
    parser.add_argument("--work", type=Path, default=REPO / "resources" / "fidelity",
                        help="unpacked CIFAR-10 and dataset caches (reused), run directories (removed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "FIDELITY.md")
    args = parser.parse_args(argv)
    smoke = args.smoke
    rows = args.rows or (SMOKE_ROWS if smoke else FULL_ROWS)
    k = args.seeds or (2 if smoke else 3)
    epochs = args.epochs or (1 if smoke else 2)
    n_train = args.n_train or (256 if smoke else 4096)
    n_test = args.n_test or (256 if smoke else 2000)

    sys.path.insert(0, str(REPO / "tests" / "fidelity"))
    from oracle import load_reference, reference_missing

    why = reference_missing()
    if why:
        raise SystemExit(f"benchmarks.fidelity: {why}")
    ref = load_reference()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    import shutil

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results, subsets = [], {}
    scratch = Path(tempfile.mkdtemp(prefix="fidelity-", dir=args.work))
    try:
        for key in rows:
            row = ROWS[key]
            recipe, overrides = table_row(row)
            extra = {"scheduler.epochs": epochs, **(SMOKE_MODEL if smoke else {})}
            options = {**overrides, **extra}
            dataset = yaml.safe_load((RECIPES / recipe).read_text())["dataset"]["name"]
            if dataset not in subsets:
                subsets[dataset] = load_subset(dataset, args.data_root, args.work, n_train, n_test)
            data = subsets[dataset]
            errors = {"reference": [], "imgclf": []}
            seconds = {"reference": 0.0, "imgclf": 0.0}
            for seed in range(k):
                opts = {**options, "train.seed": seed}
                t0 = time.perf_counter()
                errors["reference"].append(train_reference(ref, reference_config(ref, row.ref_files, opts), data))
                t1 = time.perf_counter()
                errors["imgclf"].append(train_imgclf(recipe, opts, data, scratch))
                seconds["reference"] += t1 - t0
                seconds["imgclf"] += time.perf_counter() - t1
                print(f"{key} seed {seed}: reference {errors['reference'][-1]:.2f} %, "
                      f"imgclf {errors['imgclf'][-1]:.2f} %", flush=True)
            spec = yaml.safe_load((TABLES / f"{row.table}.yaml").read_text())
            label = next(r["label"] for r in spec["rows"] if r["id"] == row.row_id)
            results.append({"label": label, "table": row.table, "row_id": row.row_id, "dataset": dataset,
                            "n_train": len(data.train_labels), "n_test": len(data.test_labels), "epochs": epochs,
                            "reference": errors["reference"], "imgclf": errors["imgclf"],
                            "p": permutation_p(errors["imgclf"], errors["reference"]),
                            "t": welch_t(errors["imgclf"], errors["reference"]),
                            "extra": " ".join(f"{a} {b}" for a, b in extra.items()),
                            "seconds_ref": seconds["reference"], "seconds_ours": seconds["imgclf"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from benchmarks.common import cpu_model

    settings = {"command": "python -m benchmarks.fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
                "cpu": cpu_model(), "load_start": load_start, "load_end": os.getloadavg()[0],
                "seeds": list(range(k)), "seconds": time.perf_counter() - started, "commit": git_commit()}
    text = report(results, settings, smoke)
    if args.out.is_file() and NOTES in args.out.read_text():  # hand-written reading of the numbers
        text += "\n" + NOTES + args.out.read_text().split(NOTES, 1)[1]
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
