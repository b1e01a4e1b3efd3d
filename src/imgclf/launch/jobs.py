"""One seed's submitted job as the submitting side sees it.

- The run directory is owned by one submitter at a time: an ``flock`` on ``<run_dir>/.lock``,
  which the kernel releases when its holder dies, so a crashed holder never leaves it stuck.
- ``<run_dir>/job.json`` records the submitted job (launcher, job id, tasks, log folder) and, when
  it failed, why: a re-run re-attaches to a job that is still queued or running instead of
  submitting a second one, and a retry of a failure that cannot pass (a cancelled job, an error
  in the job, a refused submission) fails at once with the same line instead of resubmitting.
- The scheduler is asked about jobs through one ``sacct`` of this user's jobs, cached in a file
  that every waiting process on this machine shares: the polling load is one query per
  :data:`POLL_S` seconds, whatever the number of seeds in flight.
- A failed job is described on one line: the seed, the SLURM job id and state, the last error
  line from the job, and its log's path.
"""
from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from imgclf.utils import InputError, read_json_object, write_json

RECORD = "job.json"
LOCK = ".lock"
POLL_S = float(os.environ.get("IMGCLF_SLURM_POLL_S", "30"))  # the shared sacct cache's refresh period

# sacct states of a job that may still run; anything else has ended.
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                    "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "UNKNOWN"})
# Failures that can pass on another try: the node or the scheduler failed, not the job.
RETRYABLE = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})
# sbatch refusals that are about the scheduler's health rather than the request.
_TRANSIENT = re.compile(r"temporar|timed? ?out|try again|socket|unable to contact|connection", re.I)
# The last line of a Python traceback: "pkg.mod.SomeError: message".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")
_STEPD = re.compile(r"slurmstepd(?:-[\w.-]+)?: error: (.*)$")  # "slurmstepd-<host>: error: ..." on newer SLURMs


class JobError(RuntimeError):
    """A seed's job failed; ``str()`` is its one line. ``retryable`` says whether another try can pass."""

    def __init__(self, message: str, state: str = "FAILED", retryable: bool = False, job_id: str | None = None):
        super().__init__(message)
        self.state, self.retryable, self.job_id = state, retryable, job_id


def say(message: str) -> None:
    """What the user sees in the terminal (the Snakemake job's stderr), one line per event."""
    print(f"imgclf: {message}", file=sys.stderr, flush=True)


def seed_label(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}"


# --- the run directory's lock and job record ------------------------------------------------

class RunLock:
    """Exclusive ownership of a run directory by this process while it submits and waits."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise JobError(f"{seed_label(self.run_dir)}: already owned by {holder}; wait for it, or stop it with "
                           f"`imgclf cancel {self.run_dir}`", state="LOCKED") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The seed's job record, or None. A garbage record is no record (the next launch rewrites
    it), said once in a warning naming the file rather than dropped without a word."""
    path = Path(run_dir) / RECORD
    try:
        return read_json_object(path, "the seed's job record (a JSON object)")
    except FileNotFoundError:
        return None
    except (InputError, OSError) as e:
        import logging

        logging.getLogger(__name__).warning("%s; ignored", e)
        return None


def write_record(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    record = {**(read_record(run_dir) or {}), **fields}
    write_json(Path(run_dir) / RECORD, record)
    return record


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
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one refresh at a time; the others read its result
        try:
            cached = json.loads(path.read_text())
            # a cache of another shape (truncated, hand-edited) is refreshed, not a KeyError
            if not (isinstance(cached.get("time"), (int, float)) and isinstance(cached.get("states"), dict)):
                raise ValueError(path)
        except (OSError, ValueError, AttributeError):
            cached = {"time": 0.0, "states": {}}
        if time.time() - cached["time"] >= POLL_S:
            cached = {"time": time.time(), "states": _sacct()}
            write_json(path, cached)
    return {j: cached["states"].get(j, "UNKNOWN") for j in job_ids}


# --- submitting, re-attaching and waiting ----------------------------------------------------

def _slurm_job(folder: Path, job_id: str, tasks: int):
    from submitit.slurm.slurm import SlurmJob

    return SlurmJob(folder=folder, job_id=job_id, tasks=tuple(range(tasks)))


def _result_files(job, tasks: int) -> list[Path]:
    from submitit.core.utils import JobPaths

    return [JobPaths(job.paths.folder, job.job_id, t).result_pickle for t in range(tasks)]


def launch(run_dir: str | Path, launcher: str, resources, job_name: str, evaluate: bool, submit_fn,
           attempt: int = 1) -> dict[str, Any]:
    """Run ``run_dir``'s training through ``launcher`` (local | slurm) and return rank 0's result.

    Holds the run directory's lock throughout. Under SLURM: re-attaches to the seed's job if it
    is still queued or running; on a retry (``attempt`` > 1), refuses to resubmit after a failure
    that cannot pass. ``submit_fn(run_dir, launcher, resources, job_name, evaluate)`` submits."""
    run_dir = Path(run_dir)
    label = seed_label(run_dir)
    with RunLock(run_dir):
        record = read_record(run_dir) or {}
        failure = record.get("failure")
        if attempt > 1 and failure and not failure.get("retryable"):
            raise JobError(f"{failure['message']} (not retried: {failure['state']} cannot pass on another try)",
                           failure["state"], False, record.get("job_id"))
        job, tasks = None, resources.nodes * resources.tasks_per_node
        if launcher == "slurm" and record.get("launcher") == "slurm" and record.get("job_id"):
            state = slurm_states([record["job_id"]], fresh=True)[record["job_id"]]
            if state in ACTIVE and state != "UNKNOWN":
                tasks = int(record.get("tasks", 1))
                job = _slurm_job(Path(record["folder"]), record["job_id"], tasks)
                say(f"{label}: re-attached to SLURM job {job.job_id} ({state}), not submitting another")
        if job is None:
            try:
                job = submit_fn(run_dir, launcher, resources, job_name, evaluate)
            except Exception as e:  # noqa: BLE001 - sbatch's refusal, as one line
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [""]
                cause = lines[-1].strip()
                retry = bool(_TRANSIENT.search(cause))
                message = f"{label}: submission refused: {cause}"
                write_record(run_dir, failure={"state": "REFUSED", "message": message, "retryable": retry,
                                               "time": time.time()})
                raise JobError(message, "REFUSED", retry) from None
            write_record(run_dir, launcher=launcher, job_id=str(job.job_id), tasks=tasks,
                         folder=str(job.paths.folder), submitted=time.time(), failure=None)
            what = "SLURM job" if launcher == "slurm" else "local job"
            say(f"{label}: submitted {what} {job.job_id} ({_describe(resources)})")
        return _wait(run_dir, label, launcher, job, tasks)


def _describe(res) -> str:
    gpus = f"{res.gpus} GPU(s)" if res.gpus else "no GPU"
    return (f"{res.nodes} node(s) x {res.tasks_per_node} task(s), {gpus}, {res.cpus_per_task} CPU(s) and "
            f"{res.mem_gb:g} GB per task, {res.time_min} min")


def _wait(run_dir: Path, label: str, launcher: str, job, tasks: int) -> dict[str, Any]:
    state = "RUNNING"
    previous = signal.getsignal(signal.SIGTERM)
    main = threading.current_thread() is threading.main_thread()
    if main:  # Snakemake stops its jobs with SIGTERM: say what keeps running, as for Ctrl-C
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if launcher == "slurm":
            files = _result_files(job, tasks)
            unknown_since = None
            while not all(f.exists() for f in files):
                state = slurm_states([str(job.job_id)])[str(job.job_id)]
                if state == "UNKNOWN":  # not in the cache yet; if it stays so, ask the scheduler itself
                    unknown_since = unknown_since or time.monotonic()
                    if time.monotonic() - unknown_since > 2 * POLL_S + 30:
                        state = slurm_states([str(job.job_id)], fresh=True)[str(job.job_id)]
                        unknown_since = None if state != "UNKNOWN" else unknown_since
                        if state == "UNKNOWN":
                            break  # neither sacct nor squeue knows it: it has ended
                else:
                    unknown_since = None
                if state not in ACTIVE:
                    break
                time.sleep(1)
            job._results_timeout_s = 5 if state not in ACTIVE else job._results_timeout_s
        try:
            results = job.results()  # one per task; rank 0's is the run's
        except Exception as e:  # noqa: BLE001 - described on one line below
            raise _failure(run_dir, label, launcher, job, e) from None
    except KeyboardInterrupt:
        if launcher == "slurm":
            state = slurm_states([str(job.job_id)], fresh=True)[str(job.job_id)]
            if state in ACTIVE:
                say(f"{label}: interrupted; SLURM job {job.job_id} is still {state}: the next run re-attaches to "
                    f"it; stop it with `imgclf cancel {run_dir}` (or `scancel {job.job_id}`)")
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    write_record(run_dir, state="COMPLETED", failure=None)
    return results[0]


def _failure(run_dir: Path, label: str, launcher: str, job, error: Exception) -> JobError:
    job_id = str(job.job_id)
    state = "FAILED"
    if launcher == "slurm":
        state = slurm_states([job_id], fresh=True)[job_id]
        if state in ACTIVE or state == "COMPLETED":  # e.g. rank 0 raised while another rank ends
            state = "FAILED"
    logs = sorted(Path(job.paths.folder).glob(f"{job_id}_*_log.err"))
    cause = last_error_line(str(error), [p.read_text(errors="replace") for p in logs if p.is_file()], state)
    where = logs[0] if logs else Path(job.paths.folder)
    kind = "SLURM job" if launcher == "slurm" else "local job"
    retryable = state in RETRYABLE
    message = f"{label}: {kind} {job_id} {state}: {cause}; log {where}"
    write_record(run_dir, state=state, failure={"state": state, "message": message, "retryable": retryable,
                                                "time": time.time()})
    return JobError(message, state, retryable, job_id)


def last_error_line(error_text: str, logs: list[str], state: str) -> str:
    """The line that says why: the exception the job raised (from submitit's error, else from the
    logs), or for a cancelled or killed job SLURM's own line ("*** JOB 12 ON n1 CANCELLED AT ...")."""
    def exception(text: str) -> str | None:
        for line in reversed(text.splitlines()):
            m = _EXCEPTION.match(line.strip())
            if m and m.group(1) not in ("UncompletedJobError", "FailedJobError"):
                return f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
        return None

    def stepd() -> str | None:
        for text in logs:
            for line in reversed(text.splitlines()):
                m = _STEPD.search(line)
                if m:
                    return m.group(1).strip(" *")
        return None

    if state in ("CANCELLED", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED"):
        found = stepd() or exception(error_text) or next(filter(None, map(exception, logs)), None)
    else:
        found = exception(error_text) or next(filter(None, map(exception, logs)), None) or stepd()
    return found or {"CANCELLED": "cancelled before it started"}.get(state, "no error line in the job's log")


# --- cancelling -------------------------------------------------------------------------------

def cancel(run_dirs: list[Path]) -> list[str]:
    """scancel the still queued or running SLURM jobs of ``run_dirs``; one line per job stopped."""
    records = {d: r for d in run_dirs if (r := read_record(d)) and r.get("launcher") == "slurm" and r.get("job_id")}
    states = slurm_states(sorted({r["job_id"] for r in records.values()}), fresh=True) if records else {}
    lines = []
    for run_dir, record in records.items():
        state = states.get(record["job_id"], "UNKNOWN")
        if state in ACTIVE and state != "UNKNOWN":
            subprocess.run(["scancel", record["job_id"]], check=True, capture_output=True, text=True)
            lines.append(f"{seed_label(run_dir)}: cancelled SLURM job {record['job_id']} (was {state})")
    return lines


# --- what can be refused before submitting ---------------------------------------------------

def device_problem(config: dict[str, Any], launcher: str, gpus: int) -> str | None:
    """Why a resolved config cannot run on the device its job will get, or None: e.g. fp16 on a
    job without a GPU. The engine's own precision check decides (``Precision`` on a CPU device)."""
    precision = str(config.get("train", {}).get("precision", "fp32"))
    if precision in ("fp32", "bf16", "tf32", "O0"):  # never refused on a CPU: no torch import
        return None
    import torch

    if gpus > 0 if launcher == "slurm" else torch.cuda.is_available():
        return None
    from imgclf import config as C
    from imgclf.engine.precision import Precision

    try:
        Precision(C.PRECISION_ALIASES.get(precision, precision), torch.device("cpu"))
    except ValueError as e:
        where = "resources.gpus is 0" if launcher == "slurm" else f"launcher {launcher} on a machine without CUDA"
        return f"its job gets no GPU ({where}), and {e}"
    return None


def launcher_summary(launcher: str, defaults: dict[str, Any]) -> str:
    """The line a workflow prints first: where its training jobs will run, with what by default."""
    if launcher == "debug":
        return "imgclf launcher: debug (training inside each Snakemake job, on this machine)"
    gpus = int(defaults.get("gpus", 0) or 0)
    ask = f"{gpus} GPU(s)" if gpus else "no GPU"
    return (f"imgclf launcher: {launcher} (each seed one submitit job; by default {ask}, "
            f"{defaults.get('cpus_per_task', '?')} CPU(s), {defaults.get('mem_gb', '?')} GB per task, "
            f"{defaults.get('time_min', '?')} min; a row's resources replace these)")
