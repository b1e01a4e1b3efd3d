"""``local``: submitit's local executor, N tasks = N DDP ranks on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from imgclf.launch.base import register
from imgclf.launch.resources import Resources
from imgclf.launch.submitting import SubmititLauncher

# submitit's local executor signals at most this long before its timeout.
MAX_SIGNAL_DELAY_S = 30
SUBMITIT_EXECUTOR = "local"  # what submitit's local executor sets in its tasks' SUBMITIT_EXECUTOR


class LocalLauncher(SubmititLauncher):
    name = "local"
    job_kind = "local job"

    def started(self, env: Mapping[str, str]) -> bool:
        return bool(env.get("SUBMITIT_LOCAL_JOB_ID"))

    def rendezvous(self, env: Mapping[str, str]) -> str | None:
        if env.get("SUBMITIT_EXECUTOR", "") == SUBMITIT_EXECUTOR and env.get("SUBMITIT_LOCAL_JOB_ID"):
            return "submitit-local"
        return None

    def executor(self, folder: Path, res: Resources):
        import submitit

        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node,
                             gpus_per_node=res.gpus, signal_delay_s=self.job_signal_delay_s(res))
        return ex

    def job_signal_delay_s(self, res: Resources) -> int:
        return min(res.signal_delay_s, MAX_SIGNAL_DELAY_S)

    def local_cores(self, threads: int, resources: dict[str, Any]) -> int:
        return threads * int(resources.get("tasks", 1) or 1)  # every rank runs here


register(LocalLauncher())
