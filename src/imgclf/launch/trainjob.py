"""The callable every submitted job runs: train a run directory (which already holds its
resolved ``config.yaml``) to completion, then, with ``evaluate``, score its saved final weights
(-> eval.json) on rank 0, so a seed costs one allocation, not two."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# Seconds kept, after the checkpoint wait, for submitit to requeue the job before SLURM's kill.
REQUEUE_MARGIN_S = 20


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

    @property
    def outcome_file(self) -> Path:
        """The file the job writes last: the submitting side waits for it."""
        return Path(self.run_dir) / ("eval.json" if self.evaluate else "result.json")

    def read_outcome(self) -> dict[str, Any]:
        import json

        return json.loads((Path(self.run_dir) / "result.json").read_text(encoding="utf-8"))

    def __call__(self) -> dict[str, Any]:
        from imgclf.engine import trainer

        _job_setup()
        self._stop = self._stop or threading.Event()  # a stop requested before training began stands
        self._saved = threading.Event()
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

    def request_stop(self) -> None:
        """Ask the training to checkpoint and stop at its next step boundary (from a signal handler)."""
        if self._stop is None:
            self._stop = threading.Event()
        self._stop.set()

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
