import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "config" / "recipes"
DIGITS = RECIPES / "digits" / "resnet_preact.yaml"
# A tiny ResNet-PreAct on the digits: seconds per run on one CPU thread.
TINY = {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8, "scheduler.epochs": 3,
        "train.batch_size": 128, "train.checkpoint_period": 1, "validation.batch_size": 512}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Dataset caches go to a per-session folder, never the repository's resources/."""
    os.environ["IMGCLF_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    yield


def shrink_official_sizes(monkeypatch, reader: str, train: int, test: int) -> None:
    """The official split sizes of every catalog dataset read by ``reader`` ('idx' | 'cifar'),
    shrunk to what a test's generated files hold."""
    from imgclf import catalog

    for entry in catalog.DATASETS.values():
        if entry.reader == reader:
            monkeypatch.setitem(entry.split_sizes, "train", train)
            monkeypatch.setitem(entry.split_sizes, "test", test)


def lift_published_checksums(monkeypatch, name: str) -> None:
    """A dataset's published checksums, lifted for generated files that are not its release."""
    from imgclf import catalog

    entry = catalog.DATASETS[name]
    for sums in (entry.md5, entry.gz_md5):
        for stem in list(sums):
            monkeypatch.delitem(sums, stem)


def require(available: bool, reason: str) -> None:
    """A service or data path that CI provides (the SLURM cluster, the real datasets, the reference
    README): under CI=true its absence fails the test, so CI cannot go green without it; elsewhere
    the test skips with ``reason``."""
    if available:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: CI provides it, so its absence is a failure)", pytrace=False)
    pytest.skip(reason)


def shared_data_root() -> Path | None:
    """The real datasets: $IMGCLF_TEST_DATA_ROOT, else ../shared/data beside the repository."""
    root = os.environ.get("IMGCLF_TEST_DATA_ROOT") or str(REPO.parent / "shared" / "data")
    return Path(root) if Path(root).is_dir() else None


@pytest.fixture
def data_root() -> Path:
    root = shared_data_root()
    require(root is not None, "real datasets not found: set IMGCLF_TEST_DATA_ROOT or place them in ../shared/data")
    return root


def make_run(run_dir: Path, **overrides):
    """A run directory with a resolved tiny config (digits)."""
    from imgclf import config as C, runs

    cfg = C.build(DIGITS, {**TINY, **overrides})
    return runs.prepare(cfg, run_dir, resume=True)


def imgclf_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgclf", *args]


def planned_jobs(out) -> dict[str, int]:
    """The 'Job stats' block of a Snakemake dry run: {rule: count} ({} for nothing to do)."""
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[1].split("total")[0]
    return {line.split()[0]: int(line.split()[1]) for line in block.strip().splitlines()[2:] if line.strip()}


def stop_during_step(trainer, n: int, stop) -> None:
    """Set ``stop`` (the trainer's stop event, as SLURM's warning does) while its n-th training
    step runs, so it stops at the next step boundary: with the digits' 11 steps an epoch, n = 14
    stops at epoch 2 step 4."""
    inner, calls = trainer.step, []

    def counting(*args):
        calls.append(1)
        if len(calls) == n:
            stop.set()
        return inner(*args)

    trainer.step = counting


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch working folder: the cache under resources/cache, the data root under data/."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "resources" / "cache"))
    monkeypatch.setenv("IMGCLF_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path
