"""Several seeds in one job: each its own process on the job's one GPU (or its CPUs).

:class:`PackJob` is the callable a packed job runs. It starts one member process per seed
(``python -m imgclf.launch.pack <run_dir> <k>``), each training its own run directory exactly as a
solo job does (same config, same thread count, same checkpoints), so a packed seed's numbers are
its solo numbers. What the pack adds:

- each member may use 1/k of the GPU's memory (``torch.cuda.set_per_process_memory_fraction``),
  and CUDA MPS is started for the job where ``nvidia-cuda-mps-control`` exists, so the members'
  kernels share the GPU instead of time-slicing it (both recorded in each seed's env.json);
- isolation: a member that fails or diverges ends alone; the others train on;
- preemption: the job's warning signal reaches every member (by the pack, and by the scheduler
  where it signals the whole step), each checkpoints at its next step boundary, and the requeued
  job starts again only the members that have not finished.

The outcome of every member (finished, failed with its error line, or stopped) is written to
``<pack_dir>/pack.json`` when all have ended, which is what the submitting side waits for.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUTCOME = "pack.json"
STOPPED_EXIT = 75  # a member that checkpointed on request (EX_TEMPFAIL): resumed by the requeued job
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def seed_done(run_dir: str | Path) -> bool:
    """Whether the seed's training and scoring both ended with a well-formed record."""
    from imgclf import records

    run_dir = Path(run_dir)
    if not ((run_dir / records.RESULT).is_file() and (run_dir / records.EVAL).is_file()):
        return False
    try:
        records.read_seed(run_dir)
    except (records.RecordError, OSError):
        return False
    return True


class PackJob:
    """The submitted callable of a packed job (picklable: paths and numbers only)."""

    def __init__(self, pack_dir: str | Path, run_dirs: list[str | Path], signal_delay_s: int = 90, gpus: int = 0,
                 share: str = "", failed: dict[str, Any] | None = None):
        # Resolved once, on the submitting side: the outcome is keyed by these strings there, and a
        # compute node may resolve a symlinked path otherwise.
        self._set(str(Path(pack_dir).resolve()), [str(Path(d).resolve()) for d in run_dirs], signal_delay_s,
                  gpus, share, dict(failed or {}))

    def _set(self, pack_dir, run_dirs, signal_delay_s, gpus, share, failed):
        self.pack_dir, self.run_dirs, self.signal_delay_s = pack_dir, run_dirs, signal_delay_s
        self.gpus, self.share = gpus, share
        self.failed = failed  # members that failed in an earlier attempt of this job: not trained again
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, Path] = {}
        self._stopping = False

    def __getstate__(self):
        return {"pack_dir": self.pack_dir, "run_dirs": self.run_dirs, "signal_delay_s": self.signal_delay_s,
                "gpus": self.gpus, "share": self.share, "failed": self.failed}

    def __setstate__(self, state):
        self._set(state["pack_dir"], state["run_dirs"], state["signal_delay_s"], state["gpus"],
                  state.get("share", ""), state.get("failed", {}))

    @property
    def outcome_file(self) -> Path:
        return Path(self.pack_dir) / OUTCOME

    def read_outcome(self) -> dict[str, Any]:
        return json.loads(self.outcome_file.read_text(encoding="utf-8"))

    def __call__(self) -> dict[str, Any]:
        from imgclf.utils import write_json

        self.outcome_file.unlink(missing_ok=True)  # written at the end of this attempt, by it alone
        job_id = _job_id()
        size = len(self.run_dirs)
        env = member_env(os.environ, size)
        # A scancel or a preemption signals every process of the job with SIGTERM (submitit lets
        # it pass this one): the members checkpoint and stop, and no outcome is written, so the
        # submitting side takes the job's end from the scheduler (CANCELLED, or requeued).
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stop_members())
        outcomes: dict[str, Any] = dict(self.failed)
        mps = None
        try:
            mps = start_mps(job_id, env) if self.gpus and not self.share else None
            env["IMGCLF_MPS"] = "1" if mps else "0"
            for run_dir in self.run_dirs:
                if run_dir in outcomes:
                    continue
                if seed_done(run_dir):  # finished before a requeue: not trained twice
                    outcomes[run_dir] = {"state": "COMPLETED"}
                    continue
                self._logs[run_dir] = Path(run_dir) / "submitit" / f"pack_{job_id}.log"
                self._logs[run_dir].parent.mkdir(parents=True, exist_ok=True)
                with open(self._logs[run_dir], "ab") as log:
                    self._procs[run_dir] = subprocess.Popen(
                        [sys.executable, "-m", "imgclf.launch.pack", run_dir, str(size)], env=env, stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            while any(p.poll() is None for p in self._procs.values()):
                time.sleep(0.2)  # short sleeps keep the main thread responsive to the job's signals
            outcomes.update(self._ended())
        finally:
            self._stop_members(wait_s=10.0, kill=True)  # none outlives the pack, however it ends
            if mps:
                stop_mps(mps)
            signal.signal(signal.SIGTERM, previous)
        if self._stopping or any(o["state"] == "STOPPED" for o in outcomes.values()):
            return {"preempted": True}
        write_json(self.outcome_file, {"job_id": job_id, "seeds": outcomes})
        return outcomes

    def _ended(self) -> dict[str, Any]:
        return {d: _outcome(p.returncode, self._logs[d]) for d, p in self._procs.items() if p.returncode is not None}

    def _stop_members(self, wait_s: float | None = None, kill: bool = False) -> None:
        """Ask every running member to checkpoint and stop; with ``wait_s``, wait for them that long
        (and with ``kill``, end those still running)."""
        self._stopping = self._stopping or not kill
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
        if wait_s is None:
            return
        deadline = time.monotonic() + wait_s
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if kill:
                    proc.kill()
                    proc.wait()

    def checkpoint(self, *args, **kwargs):
        """The job's warning signal (preemption, time limit): every member checkpoints and stops;
        the same pack is requeued, and its members resume (those that failed are not run again)."""
        import submitit

        self._stop_members(wait_s=max(1.0, self.signal_delay_s - 20))
        failed = {d: o for d, o in self._ended().items() if o["state"] == "FAILED"}
        return submitit.helpers.DelayedSubmission(PackJob(self.pack_dir, self.run_dirs, self.signal_delay_s,
                                                          self.gpus, self.share, {**self.failed, **failed}))


def member_env(env, size: int) -> dict[str, str]:
    """A member's environment: the pack's size, and its share of the job's CPUs (a member's torch
    threads on a GPU follow SLURM_CPUS_PER_TASK, which the job got k times)."""
    out = {**env, "IMGCLF_PACK_SIZE": str(size), "PYTHONUNBUFFERED": "1"}
    cpus = env.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit():
        out["SLURM_CPUS_PER_TASK"] = str(max(1, int(cpus) // size))
    return out


def _die_with_parent() -> None:
    """In a member, before it runs: SIGTERM it (so it checkpoints) if the pack's process dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pack's finally still stops its members


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())


def _outcome(returncode: int, log: Path) -> dict[str, Any]:
    from imgclf.launch.jobs import exception_line

    if returncode == 0:
        return {"state": "COMPLETED"}
    if returncode == STOPPED_EXIT:
        return {"state": "STOPPED", "log": str(log)}
    if returncode < 0:  # the log may hold an earlier attempt's error: the signal is this one's cause
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        return {"state": "FAILED", "cause": f"killed by {name}", "log": str(log)}
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    cause = exception_line(text) or f"exit status {returncode}, no error line in its log"
    return {"state": "FAILED", "cause": cause, "log": str(log)}


# --- CUDA MPS ------------------------------------------------------------------------------------

def start_mps(job_id: str, env: dict[str, str]) -> dict[str, str] | None:
    """Start an MPS control daemon for this job's members (its pipe and log folders are the job's
    own, so two jobs on one node never share one); None where there is no MPS, or where one already
    serves the job (SLURM's gres mps sets CUDA_MPS_PIPE_DIRECTORY)."""
    control = shutil.which("nvidia-cuda-mps-control")
    if not control or env.get("CUDA_MPS_PIPE_DIRECTORY"):
        return None
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"imgclf-mps-{job_id}"
    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(base / "log")}
    for folder in mps_env.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([control, "-d"], env={**os.environ, **mps_env}, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None  # e.g. the GPU is not in a compute mode MPS can serve: the members time-slice it
    env.update(mps_env)
    return {**mps_env, "control": control}


def stop_mps(mps: dict[str, str]) -> None:
    env = {**os.environ, **{k: v for k, v in mps.items() if k.startswith("CUDA_")}}
    try:
        subprocess.run([mps["control"]], input="quit\n", text=True, env=env, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


# --- one member ------------------------------------------------------------------------------

def member(run_dir: str, size: int) -> int:
    """Train (then score) one packed seed; the exit status tells the pack how it ended."""
    import logging

    import torch

    from imgclf.engine.trainer import Preempted
    from imgclf.launch.trainjob import TrainJob

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if size > 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0 / size)
    job = TrainJob(run_dir, evaluate=True, signal_delay_s=90)

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # one request is enough; the scheduler may signal twice
        job.request_stop()

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    try:
        job()
    except Preempted:
        return STOPPED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(member(sys.argv[1], int(sys.argv[2])))
