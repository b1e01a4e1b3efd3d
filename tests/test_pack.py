"""Several seeds in one job (resources.seeds_per_gpu): planned k to a job, each seed its own
process and run directory, its numbers its solo numbers, its failure its own."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_run, planned_jobs
from imgclf.engine import train
from imgclf.launch import Resources, get, jobs
from imgclf.launch.pack import PackJob
from imgclf.tables.plan import Plan

PACKED = {"scheduler.epochs": 2}


def same_weights(a: Path, b: Path) -> bool:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def seeds(root: Path, n: int, **overrides) -> list[Path]:
    return [make_run(root / f"seed{s}", **{**PACKED, "train.seed": s, **overrides}) for s in range(n)]


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """Seeds 0-2 trained one by one in this process: what every packed seed must equal."""
    root = tmp_path_factory.mktemp("solo")
    dirs = seeds(root, 3)
    for d in dirs:
        train(d, progress=False)
    return dirs


# --- the plan -------------------------------------------------------------------------------------

def _spec(tmp_path: Path, rows: list[dict], seeds=(0, 1, 2)) -> Path:
    tables = tmp_path / "tables"
    tables.mkdir(exist_ok=True)
    (tables / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": list(seeds), "rows": rows}))
    return tables


def _row(rid: str, lr: float, **resources) -> dict:
    return {"id": rid, "label": rid, "recipe": "digits/resnet_preact.yaml",
            "overrides": {"model.resnet_preact.depth": 8, "train.base_lr": lr}, "resources": resources}


def test_seeds_of_runs_of_one_model_are_packed_k_to_a_job_with_ids_that_depend_only_on_them(tmp_path):
    rows = [_row("a", 0.1, seeds_per_gpu=2), _row("b", 0.2, seeds_per_gpu=2), _row("c", 0.3)]
    plan = Plan.from_dir(_spec(tmp_path, rows), REPO / "config" / "recipes")
    packs = plan.packs()
    a, b = (next(r.run_id for r in plan.tables["t"].rows if r.id == i) for i in "ab")
    members = sorted(m for ms in packs.values() for m in ms)
    assert members == sorted([(a, s) for s in range(3)] + [(b, s) for s in range(3)])  # c: k = 1, not packed
    assert sorted(len(m) for m in packs.values()) == [2, 2, 2]
    assert all(re.fullmatch(r"digits-k2-[0-9a-f]{8}", p) for p in packs)
    runs = sorted([a, b])
    assert packs[next(p for p, m in packs.items() if m[0] == (runs[0], 0))] == [(runs[0], 0), (runs[0], 1)]
    assert Plan.from_dir(_spec(tmp_path, rows), REPO / "config" / "recipes").packs() == packs  # stable


def test_packs_default_from_the_config_and_a_row_can_opt_out(tmp_path):
    rows = [_row("a", 0.1), _row("b", 0.2, seeds_per_gpu=1)]
    plan = Plan.from_dir(_spec(tmp_path, rows), REPO / "config" / "recipes", defaults={"seeds_per_gpu": 3})
    (members,) = plan.packs().values()
    assert {run for run, _ in members} == {plan.tables["t"].rows[0].run_id} and len(members) == 3


def test_a_campaign_wide_default_packs_every_run_that_can_be_and_leaves_multi_gpu_rows_whole():
    plan = Plan.from_dir(REPO / "config" / "tables", REPO / "config" / "recipes",
                         defaults={"gpus": 1, "seeds_per_gpu": 4})
    packs = plan.packs()
    packed = {run for members in packs.values() for run, _ in members}
    multi = {r.run_id for r in plan.runs.values() if int(r.resources.get("gpus", 1)) > 1}
    assert multi and not multi & packed
    assert all(plan.runs[r].resources["seeds_per_gpu"] == 1 for r in multi)
    assert packed == set(plan.runs) - multi
    assert max(len(m) for m in packs.values()) == 4
    assert sum(len(m) for m in packs.values()) == sum(len(plan.runs[r].seeds) for r in packed)


def test_packing_a_multi_rank_row_is_refused_at_planning_with_the_row_named(tmp_path):
    from imgclf.tables.spec import SpecError

    with pytest.raises(SpecError, match=r"t/a: resources: seeds_per_gpu: 2 packs one-process seeds, but the job "
                                        r"asks for 1 node\(s\), 2 GPU\(s\)"):
        Plan.from_dir(_spec(tmp_path, [_row("a", 0.1, seeds_per_gpu=2, gpus=2)]), REPO / "config" / "recipes")


def test_a_packed_job_asks_for_k_times_the_cpus_and_memory_of_one_seed_and_the_same_gpus():
    packed = jobs.packed_resources(Resources(gpus=1, cpus_per_task=4, mem_gb=16, seeds_per_gpu=3), 3)
    assert (packed.gpus, packed.cpus_per_task, packed.mem_gb, packed.tasks_per_node) == (1, 12, 48, 1)


# --- the local launcher ---------------------------------------------------------------------------

def test_three_seeds_in_one_local_job_equal_their_solo_runs(tmp_path, solo):
    dirs = seeds(tmp_path, 3)
    out = jobs.launch_pack(tmp_path / "pack", dirs, get("local"), Resources(cpus_per_task=1, time_min=10), "pack")
    assert [out[d]["epochs"] for d in dirs] == [2, 2, 2]
    records = [json.loads((d / "job.json").read_text()) for d in dirs]
    assert len({r["job_id"] for r in records}) == 1  # one job
    assert all(r["state"] == "COMPLETED" and r["pack"] == str((tmp_path / "pack").resolve()) for r in records)
    for d, ref in zip(dirs, solo):
        assert same_weights(d, ref), d.name
        assert json.loads((d / "eval.json").read_text())["test_error"] == \
            json.loads((ref / "result.json").read_text())["test_error"]
        assert json.loads((d / "env.json").read_text())["pack"] == {"size": 3}
    # a re-run finds them done: no job
    again = jobs.launch_pack(tmp_path / "pack", dirs, get("local"), Resources(cpus_per_task=1), "pack")
    assert [again[d]["epochs"] for d in dirs] == [2, 2, 2]
    assert [json.loads((d / "job.json").read_text())["job_id"] for d in dirs] == [r["job_id"] for r in records]


def _no_gpu(d: Path) -> None:
    """Make the seed fail inside its process, as a real fault would: its config asks for CUDA."""
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["device"] = "cuda"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the injected fault is a CUDA device this machine lacks")
def test_one_failing_seed_leaves_the_others_finished_and_a_rerun_trains_only_it(tmp_path, solo):
    dirs = seeds(tmp_path, 3)
    _no_gpu(dirs[1])
    res = Resources(cpus_per_task=1, time_min=10)
    out = jobs.launch_pack(tmp_path / "pack", dirs, get("local"), res, "pack")
    assert same_weights(dirs[0], solo[0]) and same_weights(dirs[2], solo[2])
    error = out[dirs[1]]
    assert isinstance(error, jobs.JobError) and not error.retryable
    assert re.fullmatch(rf"{tmp_path.name}/seed1: local job \d+ \(packed\) FAILED: \w+Error: device: 'cuda' "
                        r"requested but no CUDA device is visible \(use auto or cpu\); log \S+/seed1/submitit/"
                        r"pack_\d+\.log", str(error)), str(error)
    first = {d: json.loads((d / "job.json").read_text())["job_id"] for d in dirs}
    # a retry of the same invocation does not resubmit a failure that cannot pass
    retry = jobs.launch_pack(tmp_path / "pack", dirs, get("local"), res, "pack", attempt=2)
    assert "(not retried: FAILED cannot pass on another try)" in str(retry[dirs[1]])
    # fixed, a new invocation trains that seed alone
    shutil.rmtree(dirs[1])
    dirs[1] = seeds(tmp_path, 2)[1]
    mtimes = {d: (d / "model.pt").stat().st_mtime_ns for d in (dirs[0], dirs[2])}
    out = jobs.launch_pack(tmp_path / "pack", dirs, get("local"), res, "pack")
    assert same_weights(dirs[1], solo[1])
    assert {d: (d / "model.pt").stat().st_mtime_ns for d in (dirs[0], dirs[2])} == mtimes
    now = {d: json.loads((d / "job.json").read_text()) for d in dirs}
    assert now[dirs[0]]["job_id"] == first[dirs[0]] and now[dirs[1]]["job_id"] != first[dirs[0]]
    assert now[dirs[1]]["seeds"] == [str(dirs[1].resolve())]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_a_preempted_local_pack_checkpoints_every_seed_and_resumes_them_all_bit_exactly(tmp_path):
    """SLURM's warning as the local executor delivers it (SIGUSR2 to the job's task): every seed
    stops at a step boundary with a checkpoint, the job is requeued, and each seed ends as its
    uninterrupted solo run does."""
    long = {"scheduler.epochs": 12}
    dirs = seeds(tmp_path / "packed", 3, **long)
    refs = seeds(tmp_path / "solo", 3, **long)
    res = Resources(cpus_per_task=1, time_min=10, signal_delay_s=30)
    task = PackJob(tmp_path / "pack", dirs, gpus=0)
    job = get("local").submit(tmp_path / "pack" / "submitit", res, "pack", task)
    deadline = time.monotonic() + 300
    while not all((d / "checkpoint.pt").exists() for d in dirs):
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.2)
    (task_pid,) = [p for p in _children(int(job.job_id)) if b"submitit" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(task_pid, signal.SIGUSR2)
    for d in refs:
        train(d, progress=False)  # meanwhile
    outcome = job.results()[0]
    assert {v["state"] for v in outcome.values()} == {"COMPLETED"}
    for d, ref in zip(dirs, refs):
        assert same_weights(d, ref), d.name
        log = "".join(p.read_text() for p in (d / "submitit").glob("pack_*.log"))
        assert re.search(r"stopped at epoch \d+ step \d+; checkpoint saved", log), d.name
        assert len((d / "train_log.csv").read_text().splitlines()) == 1 + long["scheduler.epochs"]


# --- through the workflow -------------------------------------------------------------------------

def test_a_packed_table_is_one_job_and_a_deleted_seed_is_trained_again_alone(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(REPO / "config" / "recipes", root / "config" / "recipes")
    (root / "config" / "tables").mkdir()
    row = {"id": "a", "label": "a", "recipe": "digits/resnet_preact.yaml",
           "overrides": {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8,
                         "scheduler.epochs": 2, "train.batch_size": 128, "validation.batch_size": 512}}
    (root / "config" / "tables" / "packed.yaml").write_text(yaml.safe_dump({"title": "P", "seeds": [0, 1, 2],
                                                                            "rows": [row]}))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["packed"], progress=False, launcher="local")
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache"), "PYTHONPATH": str(REPO / "src")}

    def snakemake(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                               "-c2", "--config", "resources={seeds_per_gpu: 3}", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)

    assert planned_jobs(snakemake("-n")) == {"all": 1, "aggregate": 1, "data": 1, "plots": 1, "render": 1,
                                             "train_pack": 1}
    out = snakemake()
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (root / "results" / "runs").iterdir()
    ids = {json.loads((run / f"seed{s}" / "job.json").read_text())["job_id"] for s in range(3)}
    assert len(ids) == 1
    assert "| a " in (root / "results" / "tables" / "packed.md").read_text()
    mtimes = {s: (run / f"seed{s}" / "model.pt").stat().st_mtime_ns for s in (0, 2)}
    shutil.rmtree(run / "seed1")
    marker = next((root / "results" / "packs").glob("*/seeds.json"))
    assert planned_jobs(snakemake("-n"))["train_pack"] == 1
    assert marker.is_file()  # planning changed nothing
    out = snakemake()
    assert out.returncode == 0, out.stderr[-3000:]
    assert {s: (run / f"seed{s}" / "model.pt").stat().st_mtime_ns for s in (0, 2)} == mtimes
    assert (run / "seed1" / "eval.json").is_file()
    assert planned_jobs(snakemake("-n")) == {}


def test_cancelling_packed_seeds_stops_their_one_job_once_and_says_it_holds_the_others(tmp_path):
    from imgclf.launch import Launcher, register, unregister

    cancelled = []

    class Counting(Launcher):
        name = "counting"

        def state(self, job_ids):
            return {j: "RUNNING" for j in job_ids}

        def cancel(self, run_dir, record, state):
            cancelled.append(record["job_id"])
            return f"cancelled job {record['job_id']} (was {state})"

    register(Counting())
    try:
        dirs = [tmp_path / "run" / f"seed{s}" for s in range(3)]
        for d in dirs:
            d.mkdir(parents=True)
            jobs.write_record(d, launcher="counting", job_id="7", pack=str(tmp_path / "pack"),
                              seeds=[str(x) for x in dirs])
        lines = jobs.cancel(dirs[:2])
    finally:
        unregister("counting")
    assert cancelled == ["7"]
    assert lines == [f"run/seed0, run/seed1: cancelled job 7 (was RUNNING) (it trains 3 packed seeds: {tmp_path / 'pack'})"]


def test_the_debug_launcher_trains_a_pack_as_processes_of_the_calling_one(tmp_path, solo):
    dirs = seeds(tmp_path, 2)
    out = jobs.launch_pack(tmp_path / "pack", dirs, get("debug"), Resources(), "pack")
    assert [out[d]["epochs"] for d in dirs] == [2, 2]
    assert all(same_weights(d, ref) for d, ref in zip(dirs, solo))
    assert {json.loads((d / "job.json").read_text())["state"] for d in dirs} == {"COMPLETED"}


def test_a_seed_owned_by_another_process_is_left_to_it_and_the_others_train(tmp_path, solo):
    dirs = seeds(tmp_path, 3)
    with jobs.RunLock(dirs[1]):
        out = jobs.launch_pack(tmp_path / "pack", dirs, get("debug"), Resources(), "pack")
    assert same_weights(dirs[0], solo[0]) and same_weights(dirs[2], solo[2])
    assert isinstance(out[dirs[1]], jobs.JobError) and "already owned by pid" in str(out[dirs[1]])
    assert not (dirs[1] / "model.pt").exists()


def test_a_seed_whose_own_job_may_still_run_is_not_packed_again(tmp_path):
    from imgclf.launch import register, unregister
    from imgclf.launch.debug import DebugLauncher

    class Busy(DebugLauncher):
        name = "busy"

        def state(self, job_ids):
            return {j: "RUNNING" for j in job_ids}

        def status(self, state):
            return "running" if state == "RUNNING" else None

    register(Busy())
    try:
        dirs = seeds(tmp_path, 2)
        jobs.write_record(dirs[0], launcher="busy", job_id="99")  # its solo job, still running
        out = jobs.launch_pack(tmp_path / "pack", dirs, get("busy"), Resources(), "pack")
    finally:
        unregister("busy")
    assert str(out[dirs[0]]) == (f"{tmp_path.name}/seed0: still trained by job 99; wait for it, or stop it with "
                                 f"`imgclf cancel {dirs[0]}`") and out[dirs[0]].retryable
    assert not (dirs[0] / "model.pt").exists() and out[dirs[1]]["epochs"] == 2


def test_a_member_gets_its_share_of_the_jobs_cpus():
    from imgclf.launch.pack import member_env

    env = member_env({"SLURM_CPUS_PER_TASK": "12", "PATH": "/bin"}, 3)
    assert (env["SLURM_CPUS_PER_TASK"], env["IMGCLF_PACK_SIZE"], env["PATH"]) == ("4", "3", "/bin")
    assert "SLURM_CPUS_PER_TASK" not in member_env({}, 3)


def test_sigterm_checkpoints_every_member_writes_no_outcome_and_the_rerun_resumes_them_bit_exactly(tmp_path):
    """As a scancel or Snakemake's stop reaches the pack: every seed checkpoints and stops, the
    pack says each was stopped (a failure that can pass), and the next run resumes them."""
    import threading

    long = {"scheduler.epochs": 12}
    dirs = seeds(tmp_path / "packed", 3, **long)
    refs = seeds(tmp_path / "solo", 3, **long)

    def stop_when_started():
        deadline = time.monotonic() + 300
        while not all((d / "checkpoint.pt").exists() for d in dirs) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the pack installs its own while it runs
    try:
        out = jobs.launch_pack(tmp_path / "pack", dirs, get("debug"), Resources(), "pack")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert all(isinstance(out[d], jobs.JobError) and out[d].state == "PREEMPTED" and out[d].retryable for d in dirs)
    assert not (tmp_path / "pack" / "pack.json").exists()
    assert not any((d / "model.pt").exists() for d in dirs)
    out = jobs.launch_pack(tmp_path / "pack", dirs, get("debug"), Resources(), "pack", attempt=2)
    for d in refs:
        train(d, progress=False)
    for d, ref in zip(dirs, refs):
        assert out[d]["epochs"] == 12 and same_weights(d, ref), d.name
