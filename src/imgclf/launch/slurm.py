"""``slurm``: submitit on SLURM, one task per GPU (or per CPU rank).

- The scheduler is asked about jobs through one ``sacct`` of this user's jobs, cached in a file
  that every waiting process on this machine shares: the polling load is one query per
  :data:`POLL_S` seconds, whatever the number of seeds in flight.
- A job's outcome is read from the scheduler and from the run directory's own JSON files
  (result.json, eval.json), never by unpickling submitit's result files: a pickle in a run
  directory is code that anyone able to write there could have put.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from imgclf.launch.base import register
from imgclf.launch.resources import Resources
from imgclf.launch.submitting import SubmititLauncher
from imgclf.utils import write_json

POLL_S = float(os.environ.get("IMGCLF_SLURM_POLL_S", "30"))  # the shared sacct cache's refresh period
SUBMITIT_EXECUTOR = "slurm"  # what submitit sets in its SLURM tasks' SUBMITIT_EXECUTOR

# sacct states of a job that may still run; anything else has ended.
_STEPD = re.compile(r"slurmstepd(?:-[\w.-]+)?: error: (.*)$")  # "slurmstepd-<host>: error: ..." on newer SLURMs
# States in which SLURM's own line (the step daemon's) says more than the job's last exception.
_KILLED = frozenset({"CANCELLED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"})
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                    "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "UNKNOWN"})


# --- the scheduler's view, at a bounded polling rate ------------------------------------------

def _cache_path() -> Path:
    root = Path(os.environ.get("IMGCLF_STATE_DIR") or Path.home() / ".cache" / "imgclf")
    cluster = hashlib.sha256(os.environ.get("SLURM_CONF", "").encode()).hexdigest()[:8]
    return root / f"sacct-{getpass.getuser()}-{cluster}.json"


def _sacct(job_ids: list[str] | None = None) -> dict[str, str]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobIDRaw,State"]
    cmd += ["-j", ",".join(job_ids)] if job_ids else ["-u", getpass.getuser(), "-S", "now-14days"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.partition("|")
        if state:
            states[job_id.strip()] = state.split()[0]  # "CANCELLED by 1000" -> CANCELLED
    return states


def _squeue(job_ids: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {i: st for i, _, st in (line.partition("|") for line in out.stdout.split()) if st}


def slurm_states(job_ids: list[str], fresh: bool = False) -> dict[str, str]:
    """{job id: sacct state} ("UNKNOWN" for a job sacct does not show yet). Unless ``fresh``, from
    the shared cache, refreshed by whichever process first finds it older than :data:`POLL_S`."""
    if fresh:
        states = _sacct(job_ids)
        missing = [j for j in job_ids if j not in states]
        if missing:  # accounting can lag a just-submitted job; the controller knows it
            states.update(_squeue(missing))
        return {j: states.get(j, "UNKNOWN") for j in job_ids}
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one refresh at a time; the others read its result
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            # a cache of another shape (truncated, hand-edited) is refreshed, not a KeyError
            if not (isinstance(cached.get("time"), (int, float)) and isinstance(cached.get("states"), dict)):
                raise ValueError(path)
        except (OSError, ValueError, AttributeError):
            cached = {"time": 0.0, "states": {}}
        if time.time() - cached["time"] >= POLL_S:
            cached = {"time": time.time(), "states": _sacct()}
            write_json(path, cached)
    return {j: cached["states"].get(j, "UNKNOWN") for j in job_ids}


class JobEnded(RuntimeError):
    """A SLURM job ended without the run's result; why is in its logs."""


class SlurmLauncher(SubmititLauncher):
    name = "slurm"
    job_kind = "SLURM job"

    def started(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("SLURM_JOB_ID"))

    def rendezvous(self, env: Mapping[str, str]) -> str | None:
        if env.get("SUBMITIT_EXECUTOR", "") == SUBMITIT_EXECUTOR and env.get("SLURM_JOB_ID"):
            return "submitit-slurm"
        return None

    def gets_gpu(self, gpus: int) -> bool:
        return gpus > 0

    def no_gpu_reason(self) -> str:
        return "resources.gpus is 0"

    def local_cores(self, threads: int, resources: dict[str, Any]) -> int:
        return 0  # the workflow's job only waits on its cluster job

    def cluster_slots(self) -> int:
        return 1

    def executor(self, folder: Path, res: Resources):
        import submitit

        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=res.max_requeues)
        ex.update_parameters(**sbatch_parameters(res))
        return ex

    # --- life cycle ------------------------------------------------------------------------
    def attach(self, run_dir: Path, record: dict[str, Any]):
        from imgclf.launch.jobs import say, seed_label

        job_id = record.get("job_id")
        if record.get("launcher") != self.name or not job_id:
            return None
        state = slurm_states([job_id], fresh=True)[job_id]
        if state not in ACTIVE or state == "UNKNOWN":
            return None
        from submitit.slurm.slurm import SlurmJob

        job = SlurmJob(folder=Path(record["folder"]), job_id=job_id, tasks=tuple(range(int(record.get("tasks", 1)))))
        say(f"{seed_label(run_dir)}: re-attached to SLURM job {job_id} ({state}), not submitting another")
        return job

    def state(self, job_ids: list[str]) -> dict[str, str]:
        return slurm_states(job_ids, fresh=True)

    def status(self, state: str) -> str | None:
        if state not in ACTIVE or state == "UNKNOWN":
            return None
        return "queued" if state == "PENDING" else "running"

    def wait(self, job, task, tasks: int) -> dict[str, Any]:
        """Until the task's last file appears (a seed's eval.json or result.json, a pack's
        pack.json) or the scheduler says the job ended; then the task's outcome. Files, not
        submitit's result pickle: a requeued job's pickle is not the last attempt's."""
        job_id = str(job.job_id)
        done = task.outcome_file
        state, unknown_since = "RUNNING", None
        while not done.is_file():
            state = slurm_states([job_id])[job_id]
            if state == "UNKNOWN":  # not in the cache yet; if it stays so, ask the scheduler itself
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > 2 * POLL_S + 30:
                    state = slurm_states([job_id], fresh=True)[job_id]
                    unknown_since = None if state != "UNKNOWN" else unknown_since
                    if state == "UNKNOWN":
                        break  # neither sacct nor squeue knows it: it has ended
            else:
                unknown_since = None
            if state not in ACTIVE:
                break
            time.sleep(1)
        if done.is_file():
            try:
                result = task.read_outcome()
            except (OSError, ValueError):
                result = None
            if isinstance(result, dict):
                return result
        raise JobEnded(f"SLURM job {job_id} ended ({state}) without writing {done.name}")

    def cause(self, error_text: str, logs: list[str], state: str) -> str:
        """The job's exception, or for a cancelled or killed job SLURM's own line
        ("*** JOB 12 ON n1 CANCELLED AT ...")."""
        from imgclf.launch.jobs import exception_line

        def stepd() -> str | None:
            for text in logs:
                for line in reversed(text.splitlines()):
                    m = _STEPD.search(line)
                    if m:
                        return m.group(1).strip(" *")
            return None

        def raised() -> str | None:
            return exception_line(error_text) or next(filter(None, map(exception_line, logs)), None)

        found = (stepd() or raised()) if state in _KILLED else (raised() or stepd())
        return found or {"CANCELLED": "cancelled before it started"}.get(state, "no error line in the job's log")

    def final_state(self, job_id: str) -> str:
        state = slurm_states([job_id], fresh=True)[job_id]
        return "FAILED" if state in ACTIVE or state == "COMPLETED" else state  # e.g. rank 0 raised

    def interrupted(self, run_dir: Path, job) -> str | None:
        job_id = str(job.job_id)
        state = slurm_states([job_id], fresh=True)[job_id]
        if state not in ACTIVE:
            return None
        return (f"interrupted; SLURM job {job_id} is still {state}: the next run re-attaches to "
                f"it; stop it with `imgclf cancel {run_dir}` (or `scancel {job_id}`)")

    def cancel(self, run_dir: Path, record: dict[str, Any], state: str) -> str | None:
        if state not in ACTIVE or state == "UNKNOWN":
            return None
        subprocess.run(["scancel", record["job_id"]], check=True, capture_output=True, text=True)
        return f"cancelled SLURM job {record['job_id']} (was {state})"


def sbatch_parameters(res: Resources) -> dict[str, Any]:
    """submitit's SLURM parameters for ``res`` (whose values :mod:`launch.resources` has checked)."""
    params: dict[str, Any] = {
        "timeout_min": res.time_min, "nodes": res.nodes, "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_gb * res.tasks_per_node,
        "slurm_signal_delay_s": res.signal_delay_s,
        # srun of SLURM 22.05-23.02 does not inherit --cpus-per-task from sbatch: without it every
        # task is pinned to one core.
        "slurm_srun_args": [f"--cpus-per-task={int(res.cpus_per_task)}"],
    }
    if res.gpu_share:  # a share of one GPU (shard or MPS) in place of the whole GPU
        params["slurm_gres"] = res.gpu_share
    elif res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    if res.qos:
        params["slurm_qos"] = res.qos
    if res.extra:
        params["slurm_additional_parameters"] = dict(res.extra)
    return params


register(SlurmLauncher())
