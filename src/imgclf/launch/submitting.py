"""What the submitit launchers share: building the executor and submitting :class:`TrainJob`."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

from imgclf.launch.base import Launcher
from imgclf.launch.resources import Resources, check_job_name


class SubmissionError(OSError):
    """The scheduler refused or could not take a job (sbatch failed); the message is one line."""


class SubmititLauncher(Launcher):
    """A launcher whose jobs are submitit jobs; subclasses build the executor."""

    def executor(self, folder: Path, res: Resources):
        raise NotImplementedError

    def job_signal_delay_s(self, res: Resources) -> int:
        return res.signal_delay_s

    def submit(self, folder, resources: Resources, job_name: str, task):
        """Submit ``task`` through submitit; returns the Job. Job files and logs go to ``folder``."""
        res = resources or Resources()
        run_dir = Path(folder).parent  # what messages name: the seed's (or the pack's) folder
        check_job_name(job_name, str(run_dir))
        # submitit prints sbatch's stderr itself, then raises with a traceback's worth of context:
        # one line instead, naming the command and its last words (e.g. "Unable to contact slurm controller").
        captured = io.StringIO()
        try:
            with contextlib.redirect_stderr(captured):
                ex = self.executor(Path(folder), res)  # no srun: RuntimeError
                ex.update_parameters(name=job_name)
                task.signal_delay_s = self.job_signal_delay_s(res)
                return ex.submit(task)
        except FileNotFoundError as e:
            raise SubmissionError(f"{run_dir}: cannot submit with launcher {self.name}: {e.filename or e} not found "
                                  "(use --launcher debug or local on a machine without SLURM)") from None
        except Exception as e:  # noqa: BLE001 - submitit's FailedJobError, CalledProcessError, OSError
            lines = [ln for ln in (str(e).strip() or captured.getvalue().strip()).splitlines() if ln.strip()]
            said = lines[-1] if lines else type(e).__name__
            raise SubmissionError(f"{run_dir}: submission with launcher {self.name} failed: {said[:300]}") from None
