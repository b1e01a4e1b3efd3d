"""The submitting side of a seed's job, without a cluster: resources, the run directory's lock and
job record, retry decisions, one-line failure causes, the status listing, and the numerics'
independence from the job's CPUs (the SLURM side is in test_slurm.py)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO, TINY, make_run


def test_memory_is_per_task_so_a_multi_gpu_job_asks_for_it_per_gpu(tmp_path):
    """4 and 8 ranks on a node must not share one task's 8 GB."""
    from imgclf.launch import Resources, get

    for gpus, mem in ((1, "8GB"), (4, "32GB"), (8, "64GB")):
        ex = get("slurm").executor(tmp_path, Resources(gpus=gpus, mem_gb=8))
        assert (ex._executor.parameters["mem"], ex._executor.parameters["ntasks_per_node"]) == (mem, gpus)
    ex = get("slurm").executor(tmp_path, Resources(gpus=0, tasks=2, mem_gb=1.5))
    assert ex._executor.parameters["mem"] == "3GB"


def test_cluster_profile_asks_for_one_gpu_per_job_by_default():
    """the cluster profile's settings give every training job a GPU."""
    profile = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    cluster = yaml.safe_load((REPO / "slurm" / profile["configfile"]).read_text())
    assert cluster["launcher"] == "slurm" and cluster["resources"]["gpus"] == 1
    assert "config" not in profile  # a --config on the command line would replace the profile's list


def _tables(tmp_path, rows):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], "rows": rows}))
    return tables


def test_row_resources_replace_the_defaults_in_both_directions(tmp_path):
    from imgclf.tables.plan import Plan

    base = {"recipe": "digits/resnet_preact.yaml", "label": "x"}
    rows = [{**base, "id": "short", "overrides": {"scheduler.epochs": 2}, "resources": {"time_min": 2, "gpus": 0}},
            {**base, "id": "plain", "overrides": {"scheduler.epochs": 3}},
            # two rows of one computation: the larger ask wins
            {**base, "id": "shared_a", "overrides": {"scheduler.epochs": 4}, "resources": {"time_min": 5}},
            {**base, "id": "shared_b", "overrides": {"scheduler.epochs": 4}, "resources": {"time_min": 9}}]
    plan = Plan.from_dir(_tables(tmp_path, rows), REPO / "config" / "recipes", {"time_min": 720, "gpus": 1})
    by_row = {r.rows[0].split("/")[1]: r.resources for r in plan.runs.values()}
    assert by_row["short"] == {"time_min": 2, "gpus": 0}
    assert by_row["plain"] == {"time_min": 720, "gpus": 1}
    assert by_row["shared_a"] == {"time_min": 9, "gpus": 1}


def test_run_directory_lock_excludes_a_second_owner_and_survives_a_crashed_one(tmp_path):
    from imgclf.launch.jobs import JobError, RunLock

    run = tmp_path / "runs" / "r" / "seed0"
    with RunLock(run):
        with pytest.raises(JobError, match=rf"r/seed0: already owned by pid {os.getpid()} on "):
            RunLock(run).__enter__()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path[:0] = sys.argv[1:]; "
                               "from imgclf.launch.jobs import RunLock; "
                               f"RunLock({str(run)!r}).__enter__(); print('held', flush=True); time.sleep(60)",
                               str(REPO / "src")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobError, match=f"pid {holder.pid}"):
            RunLock(run).__enter__()
    finally:
        holder.kill()  # a crashed holder: SIGKILL, no clean-up of its own
        holder.wait()
    with RunLock(run):
        pass


def _fake_submit(calls):
    from imgclf.launch.slurm import SlurmLauncher

    class Refused(SlurmLauncher):
        def submit(self, run_dir, resources, job_name, evaluate):
            calls.append(run_dir)
            raise RuntimeError("sbatch: error: Batch job submission failed: Requested node configuration is not "
                               "available")
    return Refused()


def test_a_retry_resubmits_only_after_a_failure_that_can_pass(tmp_path):
    from imgclf.launch import Resources, jobs

    run = tmp_path / "runs" / "r" / "seed0"
    run.mkdir(parents=True)
    calls = []
    # sbatch refusing the request is deterministic: recorded as such, and not retried
    with pytest.raises(jobs.JobError, match=r"^r/seed0: submission refused: sbatch: error: .*not available$") as e:
        jobs.launch(run, _fake_submit(calls), Resources(), "r/seed0", True, attempt=1)
    assert not e.value.retryable and len(calls) == 1
    with pytest.raises(jobs.JobError, match=r"\(not retried: REFUSED cannot pass on another try\)$"):
        jobs.launch(run, _fake_submit(calls), Resources(), "r/seed0", True, attempt=2)
    assert len(calls) == 1
    for state, retried in (("CANCELLED", False), ("FAILED", False), ("NODE_FAIL", True), ("PREEMPTED", True)):
        jobs.write_record(run, failure={"state": state, "message": f"r/seed0: SLURM job 7 {state}: x",
                                        "retryable": state in jobs.RETRYABLE})
        with pytest.raises(jobs.JobError):
            jobs.launch(run, _fake_submit(calls), Resources(), "r/seed0", True, attempt=2)
        assert len(calls) == 1 + retried, state
        calls.clear()
        calls.append(None)
    # a new invocation (attempt 1) always tries again: the seed resumes from its checkpoint
    jobs.write_record(run, failure={"state": "CANCELLED", "message": "m", "retryable": False})
    with pytest.raises(jobs.JobError, match="submission refused"):
        jobs.launch(run, _fake_submit(calls), Resources(), "r/seed0", True, attempt=1)


def test_the_cause_is_the_jobs_exception_or_slurms_own_line():
    from imgclf.launch import get

    last_error_line = get("slurm").cause

    trace = ("Job (task=0) failed during processing with trace:\n----\nTraceback (most recent call last):\n"
             '  File "x.py", line 3, in f\n    raise C.ConfigError("bad")\n'
             "imgclf.config.ConfigError: train.batch_size: 4096 is larger than the 1347 training images\n----\n"
             "You can check full logs with 'job.stderr(0)'")
    assert last_error_line(trace, [], "FAILED") == \
        "ConfigError: train.batch_size: 4096 is larger than the 1347 training images"
    cancelled = ("submitit WARNING (2026) - Bypassing signal SIGTERM\nsrun: error: vm: task 0: Killed\n"
                 "slurmstepd-vm: error: *** STEP 12.0 ON vm CANCELLED AT 2026-11-29T11:00:00 ***\n")
    error = "Job 12 (task: 0) with path x\nhas not produced any output (state: CANCELLED by 0)\n" + cancelled
    assert last_error_line(error, [cancelled], "CANCELLED") == "STEP 12.0 ON vm CANCELLED AT 2026-11-29T11:00:00"
    assert last_error_line("", [], "CANCELLED") == "cancelled before it started"
    oom = "slurmstepd: error: Detected 1 oom_kill event in StepId=5.0. Some of the step tasks have been OOM Killed.\n"
    assert last_error_line("", [oom], "OUT_OF_MEMORY").startswith("Detected 1 oom_kill event")


def test_fp16_without_a_gpu_is_found_before_submitting():
    from imgclf.launch import get

    fp16 = {"train": {"precision": "fp16"}}
    assert "its job gets no GPU (resources.gpus is 0)" in get("slurm").can_run(fp16, 0)
    assert "train.precision fp16 needs a CUDA device" in get("slurm").can_run(fp16, 0)
    assert get("slurm").can_run(fp16, 1) is None
    assert get("slurm").can_run({"train": {"precision": "bf16"}}, 0) is None


def test_status_lists_every_seed(tmp_path):
    from imgclf import config as C, status
    from imgclf.launch import jobs
    from imgclf.runs import run_id

    tables = _tables(tmp_path, [{"id": "r", "label": "R", "recipe": "digits/resnet_preact.yaml",
                                 "overrides": {"scheduler.epochs": 5}}])
    spec = yaml.safe_load((tables / "t.yaml").read_text())
    spec["seeds"] = [0, 1, 2, 3]
    (tables / "t.yaml").write_text(yaml.safe_dump(spec))
    rid = run_id(C.build(REPO / "config" / "recipes" / "digits" / "resnet_preact.yaml", {"scheduler.epochs": 5}))
    runs = tmp_path / "runs" / rid
    for k in range(3):
        (runs / f"seed{k}").mkdir(parents=True)
    (runs / "seed0" / "eval.json").write_text(json.dumps({"test_error": 1.25}))
    jobs.write_record(runs / "seed1", launcher="local", job_id="9", failure={
        "state": "FAILED", "message": f"{rid}/seed1: local job 9 FAILED: ValueError: x; log y", "retryable": False})
    (runs / "seed2" / "checkpoint.pt").write_bytes(b"")
    (runs / "seed2" / "train_log.csv").write_text("epoch\n1\n2\n")
    out = status.table_status(tables / "t.yaml", tmp_path / "runs", REPO / "config" / "recipes")
    assert [(s.seed, s.status, s.detail) for s in out] == [
        (0, "done", "test error 1.25%"), (1, "failed", f"{rid}/seed1: local job 9 FAILED: ValueError: x; log y"),
        (2, "stopped", "epoch 2/5; the next run resumes it"), (3, "missing", "")]
    assert status.render(out).endswith("4 seeds: 1 done, 1 failed, 1 stopped, 1 missing")


def test_numbers_do_not_depend_on_the_cpus_a_job_is_given(tmp_path):
    """the same config trained with 1 or 2 torch threads in the process ends with the
    same weights: the thread count is the config's (train.threads), and part of the run id."""
    from imgclf import config as C
    from imgclf.engine import train
    from imgclf.runs import run_id

    weights, recorded = [], []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # what a job with N CPUs set before training
        try:
            run = make_run(tmp_path / f"threads{threads}", **{"scheduler.epochs": 1})
            train(run, progress=False)
        finally:
            torch.set_num_threads(1)
        weights.append(torch.load(run / "model.pt", weights_only=True))
        recorded.append(json.loads((run / "env.json").read_text())["threads"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert recorded == [1, 1]
    digits = REPO / "config" / "recipes" / "digits" / "resnet_preact.yaml"
    assert run_id(C.build(digits, {**TINY, "train.threads": 2})) != run_id(C.build(digits, TINY))


def test_a_finished_job_ignores_a_late_warning_signal(tmp_path):
    """SLURM's USR2 arriving after the run finished killed the task (sacct: FAILED 12:0)."""
    run = make_run(tmp_path / "run", **{"scheduler.epochs": 1})
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from imgclf.launch import TrainJob; "
            "TrainJob(sys.argv[1])(); os.kill(os.getpid(), signal.SIGUSR2); print('survived')")
    out = subprocess.run([sys.executable, "-c", code, str(run), str(REPO / "src")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "survived", (out.returncode, out.stderr[-2000:])
    assert out.returncode != -signal.SIGUSR2


def test_a_missing_ci_service_fails_under_ci_and_skips_elsewhere(monkeypatch):
    """CI could go green with the SLURM cluster or the data paths missing."""
    from conftest import require

    require(True, "present")  # nothing happens
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no cluster \(CI=true: CI provides it"):
        require(False, "no cluster")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="^no cluster$"):
        require(False, "no cluster")


def test_scheduler_polling_stays_one_query_per_period_whatever_the_seeds_in_flight(tmp_path):
    """500 waiting seeds must not mean 500 sacct queries a period. 10 processes
    polling 500 job ids each, at once, cost one sacct call in all (a fake sacct counts them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sacct").write_text(f"#!/bin/sh\necho x >> {calls}\n"
                                   "i=1; while [ $i -le 500 ]; do echo \"$i|PENDING\"; i=$((i+1)); done\n")
    (bin_dir / "sacct").chmod(0o755)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from imgclf.launch import slurm; "
            "states = slurm.slurm_states([str(i) for i in range(1, 501)]); "
            "assert set(states.values()) == {'PENDING'}, states")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "IMGCLF_STATE_DIR": str(tmp_path / "state"),
           "IMGCLF_SLURM_POLL_S": "600"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO / "src")], env=env, stderr=subprocess.PIPE)
             for _ in range(10)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 10, [p.stderr.read() for p in procs]
    assert calls.read_text().count("x") == 1
