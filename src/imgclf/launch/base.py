"""The :class:`Launcher` interface and the registry of launchers by name.

A launcher is where a seed's training runs: in this process (debug), in submitit jobs on this
machine (local) or on SLURM (slurm). Everything that differs between them is a method here, so
the CLI, the workflow, the status listing and the engine ask the launcher instead of comparing
its name; adding a launcher is one module that calls :func:`register`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from imgclf.launch.resources import Resources

DEFAULT = "debug"  # the CLI's and a workflow's launcher when none is named
PLUGINS_ENV = "IMGCLF_LAUNCHER_MODULES"  # comma-separated modules that register more launchers


class Launcher:
    """One way of running a seed's training. Subclasses set :attr:`name` and override what differs."""

    name: str = ""
    submits: bool = True  # False: training runs inside the calling process
    job_kind: str = "job"  # how a submitted job is named in messages ("SLURM job 12")

    # --- what a process started by this launcher sees ------------------------------------------
    def started(self, env: Mapping[str, str]) -> bool:
        """Whether this process is a task of a job this launcher started (recorded in env.json)."""
        return False

    def rendezvous(self, env: Mapping[str, str]) -> str | None:
        """The :class:`engine.distenv.DistEnv` source whose variables give this task's rank and
        world ("submitit-slurm", ...), or None when the launcher sets none."""
        return None

    # --- before submitting ---------------------------------------------------------------------
    def can_run(self, config: dict[str, Any], gpus: int) -> str | None:
        """Why a resolved config cannot run on the device its job will get, or None: e.g. fp16
        on a job without a GPU. The engine's own precision check decides."""
        precision = str(config.get("train", {}).get("precision", "fp32"))
        if precision in ("fp32", "bf16", "tf32", "O0"):  # never refused on a CPU: no torch import
            return None
        if self.gets_gpu(gpus):
            return None
        import torch

        from imgclf import config as C
        from imgclf.engine.precision import Precision

        try:
            Precision(C.PRECISION_ALIASES.get(precision, precision), torch.device("cpu"))
        except ValueError as e:
            return f"its job gets no GPU ({self.no_gpu_reason()}), and {e}"
        return None

    def gets_gpu(self, gpus: int) -> bool:
        import torch

        return torch.cuda.is_available()

    def no_gpu_reason(self) -> str:
        return f"launcher {self.name} on a machine without CUDA"

    def describe(self, defaults: dict[str, Any]) -> str:
        """The line a workflow prints first: where its training jobs will run, with what by default."""
        gpus = int(defaults.get("gpus", 0) or 0)
        ask = f"{gpus} GPU(s)" if gpus else "no GPU"
        k = int(defaults.get("seeds_per_gpu", 1) or 1)
        each = f"{k} seeds to a submitit job where a run can be packed" if k > 1 else "each seed one submitit job"
        return (f"imgclf launcher: {self.name} ({each}; by default {ask}, "
                f"{defaults.get('cpus_per_task', '?')} CPU(s), {defaults.get('mem_gb', '?')} GB per task, "
                f"{defaults.get('time_min', '?')} min; a row's resources replace these)")

    def local_cores(self, threads: int, resources: dict[str, Any]) -> int:
        """The cores a workflow's training job takes on the machine running Snakemake."""
        return threads

    def cluster_slots(self) -> int:
        """How many of the workflow's `slurm_jobs` resource a training job holds while it waits."""
        return 0

    # --- the job's life cycle (see launch.jobs for the generic part) ---------------------------
    def run(self, run_dir: str | Path, resources: Resources, *, job_name: str, progress: bool | None,
            evaluate: bool, attempt: int) -> dict[str, Any]:
        """Train to completion (then evaluate) and return rank 0's result."""
        from imgclf.launch import jobs

        return jobs.launch(run_dir, self, resources, job_name, evaluate, attempt=attempt)

    def submit(self, folder: str | Path, resources: Resources, job_name: str, task):
        """Submit a job that calls ``task`` (a :class:`~imgclf.launch.trainjob.TrainJob`, or a
        :class:`~imgclf.launch.pack.PackJob` of several seeds) once per task, its files and logs in
        ``folder``; returns a submitit-like Job (``job_id``, ``paths.folder``, ``results()``). The
        launcher sets ``task.signal_delay_s`` to how long before its kill its jobs are warned."""
        able = ", ".join(n for n in names() if get(n).submits)
        raise ValueError(f"launcher: '{self.name}' cannot submit (one of {able})")

    def attach(self, run_dir: Path, record: dict[str, Any]):
        """The still queued or running job that ``record`` (job.json) names, or None."""
        return None

    def state(self, job_ids: list[str]) -> dict[str, str]:
        """{job id: the scheduler's state} of the jobs it knows, asked now."""
        return {}

    def status(self, state: str) -> str | None:
        """"queued" or "running" for a state of a job that may still run, else None."""
        return None

    def wait(self, job, task, tasks: int) -> dict[str, Any]:
        """Block until ``job`` (running ``task``) has ended; its rank 0's outcome, or an exception
        saying why there is none."""
        return job.results()[0]

    def cause(self, error_text: str, logs: list[str], state: str) -> str:
        """The line that says why a job failed: the exception it raised (from the error the wait
        raised, else from the job's logs)."""
        from imgclf.launch.jobs import exception_line

        found = exception_line(error_text) or next(filter(None, map(exception_line, logs)), None)
        return found or "no error line in the job's log"

    def final_state(self, job_id: str) -> str:
        """The state a job that raised or ended without a result is recorded with."""
        return "FAILED"

    def interrupted(self, run_dir: Path, job) -> str | None:
        """What to tell the user when waiting on ``job`` is interrupted (what keeps running)."""
        return None

    def cancel(self, run_dir: Path, record: dict[str, Any], state: str) -> str | None:
        """Stop the job ``record`` names if it may still run; the line that says so, or None."""
        return None


_REGISTRY: dict[str, Launcher] = {}


def register(launcher: Launcher) -> Launcher:
    """Make ``launcher`` available by its name (the CLI's --launcher, the config's `launcher:`)."""
    _load_builtin()
    if not launcher.name or launcher.name in _REGISTRY:
        raise ValueError(f"launcher name {launcher.name!r} is empty or already registered")
    _REGISTRY[launcher.name] = launcher
    return launcher


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_REGISTRY)


def get(name: str) -> Launcher:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"launcher: '{name}' is not one of {', '.join(_REGISTRY)}") from None


def started_by(env: Mapping[str, str]) -> str:
    """Which launcher started this process ("torchrun" for torchrun under the default launcher)."""
    for launcher in _all():  # in registration order: a local job inside a SLURM allocation is local
        if launcher.started(env):
            return launcher.name
    return "torchrun" if env.get("TORCHELASTIC_RUN_ID") else DEFAULT


def rendezvous(env: Mapping[str, str]) -> str | None:
    """The DistEnv source a launcher's job variables give this process, or None (see :meth:`Launcher.rendezvous`)."""
    for launcher in _all():
        source = launcher.rendezvous(env)
        if source:
            return source
    return None


def _all():
    _load_builtin()
    return list(_REGISTRY.values())


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from imgclf.launch import debug, local, slurm  # noqa: F401 - each registers itself

        # Launchers from elsewhere: modules that call register() when imported. An environment
        # variable, so Snakemake and the processes of its jobs all see the same launchers.
        import importlib
        import os

        for module in filter(None, os.environ.get(PLUGINS_ENV, "").split(",")):
            try:
                importlib.import_module(module.strip())
            except ImportError as e:
                raise ValueError(f"{PLUGINS_ENV}: cannot import launcher module {module.strip()!r}: {e}") from None
