"""Launching a training run through a :class:`Launcher`: ``debug`` (in-process), ``local``
(submitit's local executor, N tasks = N DDP ranks) or ``slurm`` (submitit on SLURM, one task per
GPU), each in its own module and found by name in the registry (:func:`get`, :func:`names`).

submitit is imported lazily so ``imgclf train`` needs only torch, torchvision, numpy and pyyaml.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from imgclf.launch.base import DEFAULT, Launcher, get, names, register, unregister
from imgclf.launch.resources import Resources, ResourceError
from imgclf.launch.submitting import SubmissionError
from imgclf.launch.trainjob import TrainJob, _job_setup

__all__ = ["DEFAULT", "Launcher", "ResourceError", "Resources", "SubmissionError", "TrainJob", "get", "names",
           "register", "run", "submit", "unregister"]


def submit(run_dir: str | Path, launcher: str, resources: Resources | None = None, job_name: str = "imgclf",
           evaluate: bool = False):
    """Submit the run in ``run_dir`` through ``launcher`` and return its submitit Job."""
    return get(launcher).submit(Path(run_dir) / "submitit", resources or Resources(), job_name,
                                TrainJob(run_dir, evaluate=evaluate))


def run(run_dir: str | Path, launcher: str = DEFAULT, resources: Resources | None = None,
        job_name: str = "imgclf", progress: bool | None = None, evaluate: bool = False,
        attempt: int = 1) -> dict[str, Any]:
    """Train to completion through ``launcher`` and return the result; with ``evaluate``, the
    same job then writes eval.json. A submitted job owns its run directory while it runs, a
    re-run re-attaches to it, and a failed one raises :class:`jobs.JobError` with one line (see
    :mod:`imgclf.launch.jobs`); ``attempt`` > 1 is a retry, refused after a failure that cannot pass."""
    return get(launcher).run(run_dir, resources or Resources(), job_name=job_name, progress=progress,
                             evaluate=evaluate, attempt=attempt)
