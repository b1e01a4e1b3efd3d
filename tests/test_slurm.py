"""The slurm launcher against a real SLURM cluster (.ci/run starts one with ../shared/slurm)."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_run, planned_jobs


def _controller_reachable() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not _controller_reachable(), reason="no SLURM controller reachable (sinfo failed); .ci/run starts one")]

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
             "--profile", "slurm"]
LONG = {"scheduler.epochs": 60}  # 10 steps per epoch, ~30 s: long enough to be interrupted


def wait_for(condition, timeout: float, what: str):
    """Poll an external state (the cluster's) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


def sacct_names() -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--format=JobName,State"], capture_output=True, text=True)
    return out.stdout.splitlines()


def project(tmp_path: Path, tables: list[str], extra_tables: dict | None = None) -> Path:
    root = tmp_path / "project"
    shutil.copytree(REPO / "config", root / "config")
    shutil.copytree(REPO / "slurm", root / "slurm")
    for name, table in (extra_tables or {}).items():
        (root / "config" / "tables" / f"{name}.yaml").write_text(yaml.safe_dump(table, sort_keys=False))
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    cfg.update(tables=tables, progress=False)
    cfg["resources"].update(mem_gb=2, cpus_per_task=1, time_min=20)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def snakemake(root: Path, *args: str):
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache")}
    return subprocess.run([*SNAKEMAKE, "--directory", str(root), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_quickstart_table_through_sbatch(tmp_path):
    root = project(tmp_path, ["quickstart"])
    out = snakemake(root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = (root / "results" / "tables" / "quickstart.md").read_text()
    assert md.count("| ResNet-preact-") == 3
    run_ids = sorted(p.name for p in (root / "results" / "runs").iterdir())
    names = sacct_names()
    for run_id in run_ids:
        for seed in range(3):
            assert any(f"{run_id}/seed{seed}|COMPLETED" in n for n in names), (run_id, seed)
            # one allocation per seed: the evaluation ran inside the training job
            seed_dir = root / "results" / "runs" / run_id / f"seed{seed}"
            jobs = {p.name.split("_")[0] for p in (seed_dir / "submitit").glob("*_log.out")}
            assert len(jobs) == 1 and (seed_dir / "eval.json").is_file(), (run_id, seed, jobs)
    assert planned_jobs(snakemake(root, "-n")) == {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("reference") / "run", **LONG)
    from imgclf.engine import train

    train(run, progress=False)
    return torch.load(run / "model.pt", weights_only=True)


def assert_interrupted_and_identical(run, reference, reason):
    weights = torch.load(run / "model.pt", weights_only=True)
    for k in reference:
        assert torch.equal(weights[k], reference[k]), (run.name, k)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert len((run / "train_log.csv").read_text().splitlines()) == 1 + cfg["scheduler"]["epochs"]
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.err"))
    assert reason in logs, run.name  # it really was interrupted, and then requeued
    assert len(list((run / "submitit").glob("*_0_log.out"))) >= 1


def test_preempted_job_requeues_and_resumes_exactly(tmp_path, reference):
    from imgclf.launch import Resources, submit

    run = make_run(tmp_path / "preempted", **LONG)
    job = submit(run, "slurm", Resources(time_min=20, cpus_per_task=1, mem_gb=2, max_requeues=3), "preempt-test")
    job._results_timeout_s = 5
    wait_for(lambda: (run / "checkpoint.pt").exists(), 300, "the first checkpoint")
    job._interrupt()  # SIGTERM + USR2, as SLURM preemption does
    assert job.results()[0]["epochs"] == LONG["scheduler.epochs"]
    assert_interrupted_and_identical(run, reference, "preempted")


def test_two_rank_job_preempted_requeues_and_resumes_exactly(tmp_path):
    """Only global rank 0 hears the signal (submitit checkpoints there); both ranks must stop at
    one step, rank 0 saves, and the requeued job ends as an uninterrupted 2-rank job does."""
    from imgclf.launch import Resources, submit

    ddp = {**LONG, "train.dist.world_size": 2}
    res = Resources(tasks=2, time_min=20, cpus_per_task=1, mem_gb=2, max_requeues=3)
    ref_run = make_run(tmp_path / "reference", **ddp)
    ref = submit(ref_run, "slurm", res, "ddp-reference")
    run = make_run(tmp_path / "preempted", **ddp)
    job = submit(run, "slurm", res, "ddp-preempt-test")
    job._results_timeout_s = 5
    wait_for(lambda: (run / "train_log.csv").exists(), 300, "the first epoch")
    job._interrupt()  # SIGTERM + USR2, as SLURM preemption does
    assert job.results()[0]["epochs"] == LONG["scheduler.epochs"]
    assert ref.results()[0]["world_size"] == 2
    assert_interrupted_and_identical(run, torch.load(ref_run / "model.pt", weights_only=True), "preempted")
    rank0 = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.err"))
    assert re.search(r"stopped at epoch \d+ step \d+; checkpoint saved", rank0)  # both ranks stopped cleanly


def test_job_hitting_its_time_limit_requeues_and_finishes(tmp_path):
    """A 1-minute limit, warned 45 s before it (slurmctld checks limits every ~30 s, so the
    warning lands 15-45 s in): ~70 s of training needs at least one requeue."""
    from imgclf.engine import train
    from imgclf.launch import Resources, submit

    slow = {"model.resnet_preact.initial_channels": 16, "scheduler.epochs": 100}
    run = make_run(tmp_path / "timed_out", **slow)
    job = submit(run, "slurm", Resources(time_min=1, signal_delay_s=45, cpus_per_task=1, mem_gb=2,
                                         max_requeues=8), "timeout-test")
    job._results_timeout_s = 5
    ref = make_run(tmp_path / "reference", **slow)
    train(ref, progress=False)  # meanwhile, in this process
    assert job.results()[0]["epochs"] == slow["scheduler.epochs"]
    assert_interrupted_and_identical(run, torch.load(ref / "model.pt", weights_only=True), "timed-out")


def test_failing_job_surfaces_its_error_and_reruns_alone(tmp_path):
    bad = {"title": "Failing", "seeds": [0, 1], "rows": [
        {"id": "ok", "label": "fine", "recipe": "digits/resnet_preact.yaml",
         "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 1}},
        # larger than the 1,347 training images: fails inside the job, not at planning
        {"id": "too_big", "label": "batch too large", "recipe": "digits/resnet_preact.yaml",
         "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 1, "train.batch_size": 4096}}]}
    root = project(tmp_path, ["failing"], {"failing": bad})
    out = snakemake(root)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "is larger than the 1347 training images" in text
    assert "_0_log.err" in text  # the SLURM log's path
    ok = [p for p in (root / "results" / "runs").iterdir() if (p / "seed0" / "eval.json").exists()]
    assert len(ok) == 1 and (ok[0] / "seed1" / "eval.json").exists()  # --keep-going finished the others
    failed = next(p for p in (root / "results" / "runs").iterdir() if p not in ok)
    assert not (failed / "seed0" / "result.json").exists()
    target = str((failed / "seed0" / "eval.json").relative_to(root))
    assert planned_jobs(snakemake(root, "-n", target)) == {"train": 1}
