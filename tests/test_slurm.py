"""The slurm launcher against a real SLURM cluster (.ci/run starts one with ../shared/slurm)."""
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_run, planned_jobs, require


def _controller_reachable() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


REACHABLE = _controller_reachable()
pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _cluster():
    require(REACHABLE, "no SLURM controller reachable (sinfo failed); .ci/run starts one")

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
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    # The CI cluster has no GPU: opt out of the profile's one GPU a job the documented way.
    cluster = yaml.safe_load((root / "slurm" / "cluster.yaml").read_text())
    cluster["resources"].update(gpus=0, mem_gb=2, cpus_per_task=1, time_min=20)
    (root / "slurm" / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    return root


def _env(root: Path) -> dict:
    # The shared sacct cache is polled every 2 s here (30 s by default), in a folder of this test's.
    return {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache"), "IMGCLF_SLURM_POLL_S": "2",
            "IMGCLF_STATE_DIR": str(root / "state"), "PYTHONPATH": str(REPO / "src")}


def snakemake(root: Path, *args: str):
    return subprocess.run([*SNAKEMAKE, "--directory", str(root), *args], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=1200)


def snakemake_in_background(root: Path, out: Path, *args: str) -> subprocess.Popen:
    """As a terminal runs it: its own process group, so that a Ctrl-C (SIGINT to the group) reaches
    Snakemake and its jobs."""
    # SIGINT as a terminal delivers it: a test run in the background (nohup, CI runners) inherits an
    # ignored SIGINT, which Python and so Snakemake would keep ignoring.
    return subprocess.Popen([*SNAKEMAKE, "--directory", str(root), *args], cwd=root, env=_env(root),
                            stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def imgclf(root: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "imgclf", *args], cwd=root, env=_env(root), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def sacct_jobs(name: str, since: float) -> list[tuple[str, str, str, str]]:
    """(job id, state, time limit, requested memory) of every job named ``name`` that was submitted
    at or after ``since`` (earlier tests train the same configs, so the same names)."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-S", time.strftime("%Y-%m-%dT%H:%M:%S",
                          time.localtime(since)), "--format=JobID,State,TimeLimit,ReqMem,Submit"],
                         capture_output=True, text=True)
    jobs = [line.split("|") for line in out.stdout.splitlines()]
    return [tuple(j[:4]) for j in jobs
            if time.mktime(time.strptime(j[4], "%Y-%m-%dT%H:%M:%S")) >= int(since)]


def tiny_row(row_id: str, **overrides) -> dict:
    return {"id": row_id, "label": row_id, "recipe": "digits/resnet_preact.yaml",
            "overrides": {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8,
                          "scheduler.epochs": 1, **overrides}}


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
    warning lands 15-45 s in): 200 epochs, 70-140 s of training on the CPUs CI has had, need at least one requeue."""
    from imgclf.engine import train
    from imgclf.launch import Resources, submit

    slow = {"model.resnet_preact.initial_channels": 16, "scheduler.epochs": 200}
    run = make_run(tmp_path / "timed_out", **slow)
    job = submit(run, "slurm", Resources(time_min=1, signal_delay_s=45, cpus_per_task=1, mem_gb=2,
                                         max_requeues=8), "timeout-test")
    job._results_timeout_s = 5
    ref = make_run(tmp_path / "reference", **slow)
    train(ref, progress=False)  # meanwhile, in this process
    assert job.results()[0]["epochs"] == slow["scheduler.epochs"]
    assert_interrupted_and_identical(run, torch.load(ref / "model.pt", weights_only=True), "timed-out")


def test_failing_job_says_why_on_one_line_is_not_retried_and_reruns_alone(tmp_path):
    bad = {"title": "Failing", "seeds": [0, 1], "rows": [
        {"id": "ok", "label": "fine", "recipe": "digits/resnet_preact.yaml",
         "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 1}},
        # a GPU that the CPU-only cluster's job does not have: fails inside the job, not at planning
        # (device is not part of a run id: another learning rate keeps it apart from "ok")
        {"id": "no_gpu", "label": "asks for a GPU", "recipe": "digits/resnet_preact.yaml",
         "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 1, "train.base_lr": 0.05,
                       "device": "cuda"}}]}
    root = project(tmp_path, ["failing"], {"failing": bad})
    since = time.time()
    out = snakemake(root)  # the profile's `retries: 1` is in force
    text = out.stdout + out.stderr
    assert out.returncode != 0
    failed = next(p for p in (root / "results" / "runs").iterdir() if not (p / "seed0" / "eval.json").exists())
    for seed in (0, 1):
        (job,) = sacct_jobs(f"{failed.name}/seed{seed}", since)  # one job: a deterministic failure is not retried
        line = re.compile(rf"imgclf: FAILED {failed.name}/seed{seed}: SLURM job {job[0]} FAILED: \w+Error: "
                          rf"device: 'cuda' requested but no CUDA device is visible \(use auto or cpu\); "
                          rf"log \S+/{job[0]}_0_log.err"
                          r"(?! \(not retried)")  # the first attempt's own line, not only its retry's
        assert line.search(text), text[-3000:]
        assert f"{failed.name}/seed{seed}: SLURM job {job[0]} FAILED" in text.split("seed(s) failed:")[1]
        assert "(not retried: FAILED cannot pass on another try)" in text
    assert "Traceback" not in text and "show-failed-logs" not in text
    ok = next(p for p in (root / "results" / "runs").iterdir() if p != failed)
    assert (ok / "seed0" / "eval.json").exists() and (ok / "seed1" / "eval.json").exists()  # --keep-going
    assert not (failed / "seed0" / "result.json").exists()

    listing = imgclf(root, "status", "config/tables/failing.yaml").splitlines()
    assert re.match(r"ok +0 +done +test error \d+\.\d\d%", listing[1])
    assert re.match(rf"no_gpu +0 +failed +{failed.name}/seed0: SLURM job \d+ FAILED: \w+Error: device: 'cuda'",
                    listing[3])
    assert listing[-1] == "4 seeds: 2 done, 2 failed"
    target = str((failed / "seed0" / "eval.json").relative_to(root))
    assert planned_jobs(snakemake(root, "-n", target)) == {"train": 1}


def test_settings_reach_the_job_and_a_deleted_seed_folder_reruns(tmp_path):
    """--config composes with the profile (the job is a SLURM job), nested values are typed, a row
    lowers the default time limit, memory is per task, and `rm -r` of a seed is seen."""
    table = {"title": "Settings", "seeds": [0], "rows": [{**tiny_row("short"), "resources": {"time_min": 2}}]}
    root = project(tmp_path, ["settings"], {"settings": table})
    since = time.time()
    out = snakemake(root, "--config", "progress=False", "resources={gpus: 0, cpus_per_task: 1, mem_gb: 1.5, time_min: 20}")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (root / "results" / "runs").iterdir()
    (job,) = sacct_jobs(f"{run.name}/seed0", since)
    assert job[1:] == ("COMPLETED", "00:02:00", "1.50G")
    assert f"imgclf: {run.name}/seed0: submitted SLURM job {job[0]} (1 node(s) x 1 task(s), no GPU" in out.stderr
    env = json.loads((run / "seed0" / "env.json").read_text())
    assert (env["launcher"], env["slurm_job_id"]) == ("slurm", job[0])

    shutil.rmtree(run / "seed0")
    assert planned_jobs(snakemake(root, "-n")) == {"train": 1, "aggregate": 1, "render": 1, "plots": 1, "all": 1}


def test_rerun_reattaches_to_the_queued_job_and_a_cancelled_job_is_not_retried(tmp_path):
    # long enough never to finish before it is cancelled
    table = {"title": "Queued", "seeds": [0], "rows": [tiny_row("long", **{"scheduler.epochs": 2000})]}
    root = project(tmp_path, ["queued"], {"queued": table})
    cluster = yaml.safe_load((root / "slurm" / "cluster.yaml").read_text())
    cluster["slurm"]["extra"] = {"begin": "now+1hour"}  # the seed's job waits in the queue until released
    (root / "slurm" / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    job_id, since = None, time.time()
    try:
        first = snakemake_in_background(root, tmp_path / "first.txt")
        record = lambda: json.loads(next((root / "results" / "runs").glob("*/seed0/job.json")).read_text())  # noqa: E731
        wait_for(lambda: list((root / "results" / "runs").glob("*/seed0/job.json")), 120, "the submission")
        job_id = record()["job_id"]
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C
        assert first.wait(timeout=300) != 0
        said = (tmp_path / "first.txt").read_text()
        run = next((root / "results" / "runs").iterdir())
        assert (f"imgclf: {run.name}/seed0: interrupted; SLURM job {job_id} is still PENDING: the next run "
                f"re-attaches to it; stop it with `imgclf cancel ") in said

        second = snakemake_in_background(root, tmp_path / "second.txt")
        wait_for(lambda: "re-attached" in (tmp_path / "second.txt").read_text(), 120, "the re-attachment")
        assert f"imgclf: {run.name}/seed0: re-attached to SLURM job {job_id} (PENDING), not submitting another" \
            in (tmp_path / "second.txt").read_text()
        assert re.search(rf"long +0 +queued +SLURM job {job_id}$", imgclf(root, "status", "config/tables/queued.yaml"),
                         re.M)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        wait_for(lambda: re.search(r"running +SLURM job \d+, epoch [1-9]\d*/2000",
                                   imgclf(root, "status", "config/tables/queued.yaml")), 180, "epochs running")
        assert imgclf(root, "cancel", "config/tables/queued.yaml").splitlines()[0] == \
            f"{run.name}/seed0: cancelled SLURM job {job_id} (was RUNNING)"
        assert second.wait(timeout=300) != 0
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id])
    said = (tmp_path / "second.txt").read_text()
    assert re.search(rf"^imgclf: FAILED {run.name}/seed0: SLURM job {job_id} CANCELLED: (?:JOB|STEP) {job_id}\S* "
                     r"ON \S+ CANCELLED AT \S+; log \S+_0_log.err$", said, re.M), said[-3000:]
    assert "(not retried: CANCELLED cannot pass on another try)" in said
    # never a second job ("CANCELLED by <uid>")
    assert [(j[0], j[1].split()[0]) for j in sacct_jobs(f"{run.name}/seed0", since)] == [(job_id, "CANCELLED")]


# --- several seeds in one job (resources.seeds_per_gpu) -------------------------------------------

def test_three_packed_seeds_are_one_slurm_job_and_a_preemption_resumes_all_three_bit_exactly(tmp_path):
    from imgclf.engine import train
    from imgclf.launch import Resources, get, jobs

    long = {"scheduler.epochs": 25}
    dirs = [make_run(tmp_path / "packed" / f"seed{s}", **long, **{"train.seed": s}) for s in range(3)]
    refs = [make_run(tmp_path / "solo" / f"seed{s}", **long, **{"train.seed": s}) for s in range(3)]
    since = time.time()
    res = Resources(time_min=20, cpus_per_task=1, mem_gb=1, max_requeues=3)
    box = {}
    import threading

    waiter = threading.Thread(target=lambda: box.update(out=jobs.launch_pack(
        tmp_path / "pack", dirs, get("slurm"), res, "pack-preempt-test")), daemon=True)
    waiter.start()
    wait_for(lambda: all((d / "checkpoint.pt").exists() for d in dirs), 300, "every seed's first checkpoint")
    job_id = json.loads((dirs[0] / "job.json").read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # SLURM's preemption warning
    for d in refs:
        train(d, progress=False)  # meanwhile, in this process
    waiter.join(timeout=600)
    out = box["out"]
    assert [out[d]["epochs"] for d in dirs] == [25, 25, 25]
    # one SLURM job for the three seeds (sacct says COMPLETED a moment after the outcome is written)
    wait_for(lambda: [j[:2] for j in sacct_jobs("pack-preempt-test", since)] == [(job_id, "COMPLETED")], 60,
             "the pack's one job to be COMPLETED in sacct")
    for d, ref in zip(dirs, refs):
        assert json.loads((d / "job.json").read_text())["job_id"] == job_id
        weights = torch.load(d / "model.pt", weights_only=True)
        expected = torch.load(ref / "model.pt", weights_only=True)
        assert all(torch.equal(weights[k], expected[k]) for k in expected), d.name
        log = "".join(p.read_text() for p in (d / "submitit").glob("pack_*.log"))
        assert re.search(r"stopped at epoch \d+ step \d+; checkpoint saved", log), d.name  # really interrupted
        assert len((d / "train_log.csv").read_text().splitlines()) == 1 + long["scheduler.epochs"]


def test_a_failing_packed_seed_leaves_the_others_finished_and_says_why_on_one_line(tmp_path):
    rows = [tiny_row("ok_a"), tiny_row("ok_b", **{"train.base_lr": 0.05}),
            # fails inside the job, not at planning: a GPU the CPU-only cluster's job does not have
            tiny_row("no_gpu", **{"train.base_lr": 0.02, "device": "cuda"})]
    for row in rows:
        row["resources"] = {"seeds_per_gpu": 3}
    root = project(tmp_path, ["packfail"], {"packfail": {"title": "Packed", "seeds": [0], "rows": rows}})
    since = time.time()
    out = snakemake(root)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "train_pack" in text
    runs = {p.name: p for p in (root / "results" / "runs").iterdir()}
    failed = next(p for p in runs.values() if not (p / "seed0" / "eval.json").exists())
    assert sum((p / "seed0" / "eval.json").is_file() for p in runs.values()) == 2  # the other two finished
    record = json.loads((failed / "seed0" / "job.json").read_text())
    (job,) = sacct_jobs(jobs_name := Path(record["pack"]).parent.name + "/" + Path(record["pack"]).name, since)
    assert job[0] == record["job_id"]
    line = re.compile(rf"imgclf: FAILED {failed.name}/seed0: SLURM job {job[0]} \(packed\) FAILED: \w+Error: "
                      r"device: 'cuda' requested but no CUDA device is visible \(use auto or cpu\); log \S+pack_\d+\.log")
    assert line.search(text), text[-3000:]
    assert "seed(s) failed:" in text and "Traceback" not in text.split("seed(s) failed:")[1]
    listing = imgclf(root, "status", "config/tables/packfail.yaml")
    assert re.search(rf"no_gpu +0 +failed +{failed.name}/seed0: SLURM job {job[0]} \(packed\) FAILED", listing)
    assert listing.splitlines()[-1] == "3 seeds: 2 done, 1 failed", jobs_name
