"""``debug``: training inside the calling process (under torchrun, inside each rank)."""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from imgclf.launch.base import DEFAULT, Launcher, register
from imgclf.launch.resources import Resources


class DebugLauncher(Launcher):
    name = DEFAULT
    submits = False

    def run(self, run_dir: str | Path, resources: Resources, *, job_name: str, progress: bool | None,
            evaluate: bool, attempt: int) -> dict[str, Any]:
        from imgclf.engine import train
        from imgclf.launch import jobs
        from imgclf.launch.trainjob import _evaluate

        # Under torchrun every rank shares the directory; otherwise this process owns it.
        with nullcontext() if "WORLD_SIZE" in os.environ else jobs.RunLock(run_dir):
            result = train(run_dir, progress=progress)
            if evaluate and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone
                _evaluate(run_dir)
        return result

    def describe(self, defaults: dict[str, Any]) -> str:
        return f"imgclf launcher: {self.name} (training inside each Snakemake job, on this machine)"

    def local_cores(self, threads: int, resources: dict[str, Any]) -> int:
        return threads  # one process


register(DebugLauncher())
