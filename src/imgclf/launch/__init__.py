"""Launching a training run: ``debug`` (in-process), ``local`` (submitit's local executor,
N tasks = N DDP ranks) or ``slurm`` (submitit on SLURM, one task per GPU).

Every launcher runs the same checkpointable callable, :class:`TrainJob`, on a run
directory that already holds its resolved ``config.yaml``; with ``evaluate=True`` the
same job then scores the saved final weights (-> eval.json) on rank 0, so a seed costs
one allocation, not two. submitit is imported lazily so ``imgclf train`` needs only
torch, torchvision, numpy and pyyaml.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LAUNCHERS = ("debug", "local", "slurm")
# Seconds kept, after the checkpoint wait, for submitit to requeue the job before SLURM's kill.
REQUEUE_MARGIN_S = 20


@dataclass
class Resources:
    """What one training job asks of the cluster (per row, with profile defaults)."""

    gpus: int = 0  # per node; 0 = CPU job. DDP ranks = nodes * max(gpus, tasks)
    nodes: int = 1
    tasks: int = 1  # per node, for CPU DDP (gloo); with GPUs, tasks = gpus
    cpus_per_task: int = 2
    mem_gb: float = 8  # per task (one DDP rank, one GPU): a node is asked for mem_gb * tasks_per_node
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    signal_delay_s: int = 90
    max_requeues: int = 3
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options (submitit's slurm_additional_parameters)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus if self.gpus > 0 else self.tasks


class TrainJob:
    """The submitted callable. On SLURM's warning signal submitit calls :meth:`checkpoint`:
    training runs in a worker thread, so the handler can ask it to stop at the next step
    boundary, wait for the checkpoint, and hand submitit the same job to requeue."""

    def __init__(self, run_dir: str | Path, progress: bool = False, evaluate: bool = False,
                 signal_delay_s: int = 90):
        self.run_dir = str(Path(run_dir).resolve())
        self.progress = progress
        self.evaluate = evaluate
        self.signal_delay_s = signal_delay_s
        self._stop: threading.Event | None = None
        self._saved: threading.Event | None = None

    def __getstate__(self):  # events are per process, never pickled
        return {"run_dir": self.run_dir, "progress": self.progress, "evaluate": self.evaluate,
                "signal_delay_s": self.signal_delay_s}

    def __setstate__(self, state):
        self.__init__(state["run_dir"], state["progress"], state.get("evaluate", False),
                      state.get("signal_delay_s", 90))

    def __call__(self) -> dict[str, Any]:
        from imgclf.engine import trainer

        _job_setup()
        self._stop, self._saved = threading.Event(), threading.Event()
        box: dict[str, Any] = {}

        def work():
            is_main = False
            try:
                t = trainer.Trainer(self.run_dir, progress=self.progress, stop_event=self._stop,
                                    saved_event=self._saved)
                is_main = t.is_main
                t.resume()
                box["result"] = t.fit()
                del t  # free the model, optimizer and resident data before the evaluation loads its own
            except trainer.Preempted as e:
                # Rank 0 hands submitit the requeue; the other ranks end cleanly, so no stale
                # error of theirs can be read as the requeued job's outcome.
                if is_main:
                    box["error"] = e
                else:
                    box["result"] = {"preempted": True}
            except BaseException as e:  # noqa: BLE001 - re-raised in the submitting thread
                box["error"] = e
            finally:
                self._saved.set()  # never leave a stop request waiting on a thread that has ended
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
            if self.evaluate and "result" in box and is_main:
                try:
                    _evaluate(self.run_dir)
                except BaseException as e:  # noqa: BLE001
                    box["error"] = e

        thread = threading.Thread(target=work, name="imgclf-train", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)  # short joins keep the main thread responsive to signals
        if "error" in box:
            raise box["error"]
        if threading.current_thread() is threading.main_thread():
            # Done: SLURM's warning signal arriving now (late, after a requeue) must neither
            # requeue a finished run nor kill the exiting task (sacct's FAILED 12:0).
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        return box["result"]

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self._stop is not None:
            self._stop.set()
            wait = self.checkpoint_wait_s()
            if not self._saved.wait(timeout=wait):
                log.warning("%s: no checkpoint within %.0f s of the stop request; resuming from the last one",
                            self.run_dir, wait)
        return submitit.helpers.DelayedSubmission(TrainJob(self.run_dir, self.progress, self.evaluate,
                                                           self.signal_delay_s))

    def checkpoint_wait_s(self) -> float:
        """SLURM's warning comes signal_delay_s before the kill: wait for the checkpoint at most
        that long, less REQUEUE_MARGIN_S for submitit to requeue the job (and at least 1 s)."""
        return max(1.0, self.signal_delay_s - REQUEUE_MARGIN_S)


def _job_setup() -> None:
    """In a submitted job: torch threads = the CPUs the job was given, and the env:// variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) of this task, derived by engine.distenv from the
    job's own variables. Stale ones inherited from the submitting environment are replaced (and
    said); CUDA_VISIBLE_DEVICES is left as SLURM set it, the trainer picks a visible device."""
    from imgclf.engine import distenv

    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))
    d = distenv.resolve(os.environ)
    if d.source.startswith("submitit"):
        replaced = distenv.export(d, os.environ)
        if replaced:
            log.warning("rank %d: replaced inherited %s with this job's rendezvous", d.rank, ", ".join(replaced))


def _evaluate(run_dir: str | Path) -> dict[str, Any]:
    from imgclf.engine.evaluator import evaluate_run

    return evaluate_run(run_dir)


def _submitit_executor(launcher: str, folder: Path, res: Resources):
    import submitit

    if launcher == "local":
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node,
                             gpus_per_node=res.gpus, signal_delay_s=min(res.signal_delay_s, 30))
        return ex
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=res.max_requeues)
    params: dict[str, Any] = {
        "timeout_min": res.time_min, "nodes": res.nodes, "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "mem_gb": res.mem_gb * res.tasks_per_node,
        "slurm_signal_delay_s": res.signal_delay_s,
    }
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    if res.qos:
        params["slurm_qos"] = res.qos
    if res.extra:
        params["slurm_additional_parameters"] = dict(res.extra)
    ex.update_parameters(**params)
    return ex


def submit(run_dir: str | Path, launcher: str = "debug", resources: Resources | None = None,
           job_name: str = "imgclf", evaluate: bool = False):
    """Submit the training of the run in ``run_dir`` (then its evaluation, with ``evaluate``)
    through submitit; returns the Job. Job files and logs go to ``<run_dir>/submitit/``."""
    if launcher not in ("local", "slurm"):
        raise ValueError(f"launcher: '{launcher}' cannot submit (one of local, slurm)")
    res = resources or Resources()
    # submitit prints sbatch's stderr itself, then raises with a traceback's worth of context:
    # one line instead, naming the command and its last words (e.g. "Unable to contact slurm controller").
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            ex = _submitit_executor(launcher, Path(run_dir) / "submitit", res)  # no srun: RuntimeError
            ex.update_parameters(name=job_name)
            delay = min(res.signal_delay_s, 30) if launcher == "local" else res.signal_delay_s
            return ex.submit(TrainJob(run_dir, evaluate=evaluate, signal_delay_s=delay))
    except FileNotFoundError as e:
        raise SubmissionError(f"{run_dir}: cannot submit with launcher {launcher}: {e.filename or e} not found "
                              "(use --launcher debug or local on a machine without SLURM)") from None
    except Exception as e:  # noqa: BLE001 - submitit's FailedJobError, CalledProcessError, OSError
        lines = [ln for ln in (str(e).strip() or captured.getvalue().strip()).splitlines() if ln.strip()]
        said = lines[-1] if lines else type(e).__name__
        raise SubmissionError(f"{run_dir}: submission with launcher {launcher} failed: {said[:300]}") from None


class SubmissionError(OSError):
    """The scheduler refused or could not take a job (sbatch failed); the message is one line."""


def run(run_dir: str | Path, launcher: str = "debug", resources: Resources | None = None,
        job_name: str = "imgclf", progress: bool | None = None, evaluate: bool = False,
        attempt: int = 1) -> dict[str, Any]:
    """Train to completion through ``launcher`` and return the result; with ``evaluate``, the
    same job then writes eval.json. A submitted job owns its run directory while it runs, a
    re-run re-attaches to it, and a failed one raises :class:`jobs.JobError` with one line (see
    :mod:`imgclf.launch.jobs`); ``attempt`` > 1 is a retry, refused after a failure that cannot pass."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher: '{launcher}' is not one of {', '.join(LAUNCHERS)}")
    from imgclf.launch import jobs

    if launcher == "debug":
        from contextlib import nullcontext

        from imgclf.engine import train

        # Under torchrun every rank shares the directory; otherwise this process owns it.
        with nullcontext() if "WORLD_SIZE" in os.environ else jobs.RunLock(run_dir):
            result = train(run_dir, progress=progress)
            if evaluate and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone
                _evaluate(run_dir)
        return result

    return jobs.launch(run_dir, launcher, resources or Resources(), job_name, evaluate,
                       lambda *a: submit(*a[:4], evaluate=a[4]), attempt=attempt)
