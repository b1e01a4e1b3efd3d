"""One seed's submitted job as the submitting side sees it, whatever the launcher (see
:class:`imgclf.launch.base.Launcher` for what differs between them).

- The run directory is owned by one submitter at a time: an ``flock`` on ``<run_dir>/.lock``,
  which the kernel releases when its holder dies, so a crashed holder never leaves it stuck.
- ``<run_dir>/job.json`` records the submitted job (launcher, job id, tasks, log folder) and, when
  it failed, why: a re-run re-attaches to a job that is still queued or running instead of
  submitting a second one, and a retry of a failure that cannot pass (a cancelled job, an error
  in the job, a refused submission) fails at once with the same line instead of resubmitting.
- A failed job is described on one line: the seed, the job id and state, the last error line
  from the job, and its log's path.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgclf.utils import InputError, read_json_object, write_json

RECORD = "job.json"
LOCK = ".lock"
# Failures that can pass on another try: the node or the scheduler failed, not the job.
RETRYABLE = frozenset({"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"})
# sbatch refusals that are about the scheduler's health rather than the request.
_TRANSIENT = re.compile(r"temporar|timed? ?out|try again|socket|unable to contact|connection", re.I)
# The last line of a Python traceback: "pkg.mod.SomeError: message".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit))(?::\s*(.*))?$")


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


def lock_holder(run_dir: str | Path) -> str | None:
    """Who owns the run directory now ("pid N on HOST since T"), or None. Looks only: the kernel's
    table of flock locks (/proc/locks) where there is one, so a look never holds the lock for an
    instant in which a starting job would find it taken; elsewhere a non-blocking shared flock."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        held = _flock_listed(os.fstat(fd))
        if held is None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
            except BlockingIOError:
                held = True
        return (os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process") if held else None
    finally:
        os.close(fd)


def _flock_listed(st: os.stat_result) -> bool | None:
    """Whether /proc/locks lists a flock on this file (None: no such table here)."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return any(line.split()[1:2] == ["FLOCK"] and key in line.split() for line in f)
    except OSError:
        return None


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


# --- submitting, re-attaching and waiting ----------------------------------------------------

def launch(run_dir: str | Path, launcher, resources, job_name: str, evaluate: bool,
           attempt: int = 1) -> dict[str, Any]:
    """Run ``run_dir``'s training through ``launcher`` (a :class:`~imgclf.launch.base.Launcher`)
    and return rank 0's result.

    Holds the run directory's lock throughout. Re-attaches to the seed's job if the launcher
    finds it still queued or running; on a retry (``attempt`` > 1), refuses to resubmit after a
    failure that cannot pass."""
    run_dir = Path(run_dir)
    label = seed_label(run_dir)
    with RunLock(run_dir):
        record = read_record(run_dir) or {}
        failure = record.get("failure")
        if attempt > 1 and failure and not failure.get("retryable"):
            raise JobError(f"{failure['message']} (not retried: {failure['state']} cannot pass on another try)",
                           failure["state"], False, record.get("job_id"))
        tasks = resources.nodes * resources.tasks_per_node
        job = launcher.attach(run_dir, record)
        if job is not None:
            tasks = int(record.get("tasks", 1))
        else:
            try:
                job = launcher.submit(run_dir / "submitit", resources, job_name, _task(run_dir, evaluate))
            except Exception as e:  # noqa: BLE001 - sbatch's refusal, as one line
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or [""]
                cause = lines[-1].strip()
                retry = bool(_TRANSIENT.search(cause))
                message = f"{label}: submission refused: {cause}"
                write_record(run_dir, failure={"state": "REFUSED", "message": message, "retryable": retry,
                                               "time": time.time()})
                raise JobError(message, "REFUSED", retry) from None
            write_record(run_dir, launcher=launcher.name, job_id=str(job.job_id), tasks=tasks,
                         folder=str(job.paths.folder), submitted=time.time(), failure=None)
            say(f"{label}: submitted {launcher.job_kind} {job.job_id} ({describe_resources(resources)})")
        return _wait(run_dir, label, launcher, job, _task(run_dir, evaluate), tasks)


def _task(run_dir: Path, evaluate: bool):
    from imgclf.launch.trainjob import TrainJob

    return TrainJob(run_dir, evaluate=evaluate)


def launch_pack(pack_dir: str | Path, run_dirs: list[Path], launcher, resources, job_name: str,
                attempt: int = 1) -> dict[Path, dict[str, Any] | JobError]:
    """Train several seeds in one job (see :mod:`imgclf.launch.pack`): {run_dir: its result, or the
    :class:`JobError` that says on one line why it has none}.

    Each seed keeps its own life cycle: its lock is held throughout, its job.json names the shared
    job (so status, cancel and a re-run see it), and its failure is its own. Seeds already done are
    not trained again; on a retry, a seed whose failure cannot pass is not either."""
    from contextlib import ExitStack

    from imgclf.launch.pack import PackJob, seed_done

    pack_dir = Path(pack_dir)
    label = f"{pack_dir.parent.name}/{pack_dir.name}"
    out: dict[Path, dict[str, Any] | JobError] = {}
    with ExitStack() as locks:
        todo = []
        for run_dir in run_dirs:
            try:
                locks.enter_context(RunLock(run_dir))  # a seed another process owns is left to it
            except JobError as e:
                out[run_dir] = e
                continue
            record = read_record(run_dir) or {}
            failure = record.get("failure")
            if seed_done(run_dir):
                out[run_dir] = _result(run_dir)
            elif attempt > 1 and failure and not failure.get("retryable"):
                out[run_dir] = JobError(f"{failure['message']} (not retried: {failure['state']} cannot pass on "
                                        "another try)", failure["state"], False)
            elif (other := _other_job(run_dir, record, pack_dir, launcher)) is not None:
                out[run_dir] = other
            else:
                todo.append(run_dir)
        if not todo:
            return out
        task = PackJob(pack_dir, todo, gpus=resources.gpus, share=resources.gpu_share)
        if not launcher.submits:  # the members are processes of this one
            say(f"{label}: training {len(todo)} seed(s) side by side on this machine (launcher {launcher.name})")
            with sigterm_interrupts():  # the pack's finally stops its members
                seeds = task()
            seeds = _stopped(todo) if seeds.get("preempted") else seeds
            return {**out, **{d: _member_outcome(d, seeds.get(str(d.resolve())), launcher, None) for d in todo}}
        # A re-run re-attaches to the pack's job while it may still run and holds every seed to train.
        record = read_record(pack_dir) or {}
        job = None
        if {str(d.resolve()) for d in todo} <= set(record.get("seeds", [])):
            job = launcher.attach(pack_dir, record)
        if job is None:
            task.outcome_file.unlink(missing_ok=True)  # an earlier job's outcome is not this one's
            packed = packed_resources(resources, len(todo))
            try:
                job = launcher.submit(pack_dir / "submitit", packed, job_name, task)
            except Exception as e:  # noqa: BLE001 - the scheduler's refusal, as one line per seed
                cause = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
                for run_dir in todo:
                    message = f"{seed_label(run_dir)}: submission of {label} refused: {cause}"
                    write_record(run_dir, failure={"state": "REFUSED", "message": message,
                                                   "retryable": bool(_TRANSIENT.search(cause)), "time": time.time()})
                    out[run_dir] = JobError(message, "REFUSED", bool(_TRANSIENT.search(cause)))
                return out
            for folder in (pack_dir, *todo):
                write_record(folder, launcher=launcher.name, job_id=str(job.job_id), tasks=1,
                             folder=str(job.paths.folder), pack=str(pack_dir.resolve()), submitted=time.time(),
                             failure=None, state=None, seeds=[str(d.resolve()) for d in todo])
            say(f"{label}: submitted {launcher.job_kind} {job.job_id} for {len(todo)} seed(s) "
                f"({describe_resources(packed)})")
        try:
            outcome = _wait(pack_dir, label, launcher, job, task, 1, record=False)
            seeds = _stopped(todo) if outcome.get("preempted") else outcome.get("seeds", outcome)
        except JobError as e:  # the job as a whole: every seed it held and did not finish shares its line
            seeds = {str(d.resolve()): {"state": "COMPLETED"} if seed_done(d) else
                     {"state": e.state, "message": f"{seed_label(d)}: packed in {e}", "retryable": e.retryable}
                     for d in todo}
        for run_dir in todo:
            out[run_dir] = _member_outcome(run_dir, seeds.get(str(run_dir.resolve())), launcher, job)
    return out


def _stopped(run_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """The outcome of a pack stopped before its end (its seeds checkpointed): each seed stopped."""
    return {str(d.resolve()): {"state": "STOPPED"} for d in run_dirs}


def _other_job(run_dir: Path, record: dict[str, Any], pack_dir: Path, launcher) -> JobError | None:
    """A seed whose own job (alone, or in another pack) may still run is left to that job: two jobs
    must never train one run directory."""
    job_id = record.get("job_id")
    if not job_id or record.get("launcher") != launcher.name or record.get("pack") == str(pack_dir.resolve()):
        return None
    if launcher.status(launcher.state([job_id]).get(job_id, "UNKNOWN")) is None:
        return None
    return JobError(f"{seed_label(run_dir)}: still trained by {launcher.job_kind} {job_id}; wait for it, or stop it "
                    f"with `imgclf cancel {run_dir}`", "LOCKED", True, job_id)


def packed_resources(resources, k: int):
    """A job of ``k`` packed seeds: its GPUs as asked (shared), k times the CPUs and memory of one."""
    from dataclasses import replace

    return replace(resources, cpus_per_task=resources.cpus_per_task * k, mem_gb=resources.mem_gb * k,
                   seeds_per_gpu=1)


def _result(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / "result.json").read_text(encoding="utf-8"))


def _member_outcome(run_dir: Path, seed: dict[str, Any] | None, launcher, job) -> dict[str, Any] | JobError:
    label = seed_label(run_dir)
    where = f"{launcher.job_kind} {job.job_id}" if job is not None else f"the pack (launcher {launcher.name})"
    state = (seed or {}).get("state", "FAILED")
    if state == "COMPLETED":
        write_record(run_dir, state="COMPLETED", failure=None)
        return _result(run_dir)
    if seed and "message" in seed:  # the whole job failed
        message, retryable = seed["message"], seed.get("retryable", False)
    elif state == "STOPPED":
        message, retryable = f"{label}: {where} stopped it (checkpoint saved) and ended", True
        state = "PREEMPTED"
    else:
        cause = (seed or {}).get("cause", "not in the job's outcome")
        log = (seed or {}).get("log", "none")
        message, retryable = f"{label}: {where} (packed) FAILED: {cause}; log {log}", False
    write_record(run_dir, state=state, failure={"state": state, "message": message, "retryable": retryable,
                                                "time": time.time()})
    return JobError(message, state, retryable, str(job.job_id) if job is not None else None)


def describe_resources(res) -> str:
    gpus = f"{res.gpus} GPU(s)" if res.gpus else "no GPU"
    return (f"{res.nodes} node(s) x {res.tasks_per_node} task(s), {gpus}, {res.cpus_per_task} CPU(s) and "
            f"{res.mem_gb:g} GB per task, {res.time_min} min")


@contextmanager
def sigterm_interrupts():
    """Snakemake stops its jobs with SIGTERM: inside this block (in the main thread) it raises
    KeyboardInterrupt, as Ctrl-C does, so the caller's clean-up and messages run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(run_dir: Path, label: str, launcher, job, task, tasks: int, record: bool = True) -> dict[str, Any]:
    try:
        with sigterm_interrupts():  # say what keeps running, as for Ctrl-C
            try:
                result = launcher.wait(job, task, tasks)
            except Exception as e:  # noqa: BLE001 - described on one line below
                raise _failure(run_dir, label, launcher, job, e, record) from None
    except KeyboardInterrupt:
        still = launcher.interrupted(run_dir, job)
        if still:
            say(f"{label}: {still}")
        raise
    if record:
        write_record(run_dir, state="COMPLETED", failure=None)
    return result


def _failure(run_dir: Path, label: str, launcher, job, error: Exception, record: bool = True) -> JobError:
    job_id = str(job.job_id)
    state = launcher.final_state(job_id)
    logs = sorted(Path(job.paths.folder).glob(f"{job_id}_*_log.err"))
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in logs if p.is_file()]
    cause = launcher.cause(str(error), texts, state)
    where = logs[0] if logs else Path(job.paths.folder)
    retryable = state in RETRYABLE
    message = f"{label}: {launcher.job_kind} {job_id} {state}: {cause}; log {where}"
    if record:
        write_record(run_dir, state=state, failure={"state": state, "message": message, "retryable": retryable,
                                                    "time": time.time()})
    return JobError(message, state, retryable, job_id)


def exception_line(text: str) -> str | None:
    """The last exception a Python traceback in ``text`` names, as "SomeError: message"."""
    for line in reversed(text.splitlines()):
        m = _EXCEPTION.match(line.strip())
        if m and m.group(1) not in ("UncompletedJobError", "FailedJobError"):
            return f"{m.group(1)}: {m.group(2)}" if m.group(2) else m.group(1)
    return None


# --- cancelling -------------------------------------------------------------------------------

def cancel(run_dirs: list[Path]) -> list[str]:
    """Stop the still queued or running jobs of ``run_dirs``; one line per job stopped."""
    from imgclf.launch import base

    records = {d: r for d in run_dirs if (r := read_record(d)) and r.get("launcher") in base.names()
               and r.get("job_id")}
    states = job_states(records.values())
    by_job: dict[tuple[str, str], list[Path]] = {}  # packed seeds share one job: cancelled once
    for run_dir, record in records.items():
        by_job.setdefault((record["launcher"], record["job_id"]), []).append(run_dir)
    lines = []
    for (launcher, job_id), dirs in by_job.items():
        record = records[dirs[0]]
        line = base.get(launcher).cancel(dirs[0], record, states.get(job_id, "UNKNOWN"))
        if line:
            packed = len(record.get("seeds", [])) if record.get("pack") else 0
            also = f" (it trains {packed} packed seeds: {record['pack']})" if packed else ""
            lines.append(f"{', '.join(seed_label(d) for d in dirs)}: {line}{also}")
    return lines


def job_states(records) -> dict[str, str]:
    """{job id: state} of the jobs the records name, each launcher asked once for all of its own."""
    from imgclf.launch import base

    by_launcher: dict[str, set[str]] = {}
    for r in records:
        if r.get("launcher") in base.names() and r.get("job_id"):
            by_launcher.setdefault(r["launcher"], set()).add(r["job_id"])
    states: dict[str, str] = {}
    for name, ids in by_launcher.items():
        states.update(base.get(name).state(sorted(ids)))
    return states
