"""What a training job asks of its launcher, and the check that every value reaching an sbatch
script is a value SLURM's own grammar allows: a string from a spec row or a config file must
never become a line of shell on a compute node.

Checked before anything is written (at plan time and again when a job is built): names as SLURM
spells them, ``extra`` keys from a known list of sbatch options, no control character anywhere,
numbers finite and in range.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from imgclf.utils import InputError, clip


class ResourceError(InputError):
    """A resource value that cannot reach a submission script; the message is one line."""


# A partition, account, qos, reservation or constraint name (a comma list where SLURM takes one).
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}(?:,[A-Za-z0-9_.-]{1,64}){0,31}")
# A job name: the seed's label, e.g. cifar10-resnet_preact-0123abcd/seed0.
_JOB_NAME = re.compile(r"[A-Za-z0-9_.:/+=@-]{1,200}")
# An ``extra`` option's value, e.g. a constraint "a100|h100" or "[rack1*2&rack2*4]": each lands
# on an "#SBATCH --key=value" line, so no blank, quote, '$', backslash or control character.
_OPTION_VALUE = re.compile(r"[A-Za-z0-9_.,:/=+@%*|&!\[\]-]{1,200}")

# (kind, low, high) of each number: integers unless the kind says float.
NUMBERS: dict[str, tuple[type, float, float]] = {
    "gpus": (int, 0, 64), "nodes": (int, 1, 4096), "tasks": (int, 1, 1024), "cpus_per_task": (int, 1, 1024),
    "mem_gb": (float, 0.001, 65536), "time_min": (int, 1, 525_600), "signal_delay_s": (int, 1, 86_400),
    "max_requeues": (int, 0, 1000), "seeds_per_gpu": (int, 1, 64),
}
NAMES = ("partition", "account", "qos")
# SLURM's own GPU sharing: a job asks for N shards (gres/shard) or N% of a GPU under MPS (gres/mps)
# of one GPU instead of the whole GPU. The counts are the cluster's (gres.conf), so only their form
# and a sane bound are checked here.
_GPU_SHARE = re.compile(r"(shard|mps):([1-9][0-9]{0,3})")
_GPU_SHARE_TEXT = '"" (whole GPUs), "shard:N" or "mps:N" with N a whole number in [1, 9999]'

# sbatch options a table or config may add (submitit's slurm_additional_parameters; "-" or "_").
# Options that set the script's files, environment or working directory are left out on purpose.
EXTRA_OPTIONS = frozenset({
    "acctg_freq", "begin", "clusters", "comment", "constraint", "core_spec", "cores_per_socket", "cpu_freq",
    "cpus_per_gpu", "deadline", "delay_boot", "dependency", "distribution", "exclude", "exclusive",
    "gpu_bind", "gpu_freq", "gpus", "gpus_per_socket", "gpus_per_task", "gres", "gres_flags", "hint",
    "licenses", "mail_type", "mail_user", "mcs_label", "mem_bind", "mem_per_cpu", "mem_per_gpu", "mincpus",
    "network", "nice", "no_requeue", "nodelist", "ntasks_per_core", "ntasks_per_socket", "overcommit",
    "oversubscribe", "priority", "profile", "requeue", "reservation", "sockets_per_node", "spread_job",
    "switches", "threads_per_core", "tmp", "use_min_nodes", "wckey",
})


def _number_problem(key: str, value: Any) -> str | None:
    kind, low, high = NUMBERS[key]
    integral = kind is int
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
        what = "an integer" if integral else "a number"
        return f"expected {what} in [{low:g}, {high:g}], got {clip(value)}"
    if not math.isfinite(value) or not low <= value <= high:
        return f"{clip(value)} is out of range: expected a finite number in [{low:g}, {high:g}]"
    return None


def _name_problem(value: Any, pattern: re.Pattern, what: str) -> str | None:
    if not isinstance(value, str):
        return f"expected {what}, got {clip(value)}"
    if value and not pattern.fullmatch(value):
        return f"{clip(value)} is not {what}"
    return None


_SLURM_NAME = "a SLURM name (letters, digits, '_', '.', '-'; a comma list of such)"


def _extra_problem(extra: Any) -> str | None:
    if not isinstance(extra, dict):
        return f"expected a mapping of sbatch options, got {clip(extra)}"
    for key, value in extra.items():
        if not isinstance(key, str) or key.replace("-", "_") not in EXTRA_OPTIONS:
            return (f"unknown sbatch option {clip(key)} (known: {', '.join(sorted(EXTRA_OPTIONS))})")
        if isinstance(value, bool):
            continue  # a flag: --exclusive
        if isinstance(value, int):
            if not 0 <= value <= 10**9:
                return f".{key}: {clip(value)} is out of range [0, 1e9]"
            continue
        if not isinstance(value, str) or not _OPTION_VALUE.fullmatch(value):
            return (f".{key}: {clip(value)} is not an sbatch option value (letters, digits and _.,:/=+@%*|&![]-; "
                    "no blank, quote or control character), a whole number or true/false")
    return None


def problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be resource ``key`` (None if it can); the text names what is valid."""
    if key in NUMBERS:
        return _number_problem(key, value)
    if key in NAMES:
        return _name_problem(value, _NAME, _SLURM_NAME)
    if key == "extra":
        return _extra_problem(value)
    if key == "gpu_share":
        if not isinstance(value, str) or (value and not _GPU_SHARE.fullmatch(value)):
            return f"{clip(value)} is not a GPU share: expected {_GPU_SHARE_TEXT}"
        return None
    return f"unknown key (known: {', '.join([*NUMBERS, *NAMES, 'extra', 'gpu_share'])})"


def pack_problem(values: dict[str, Any]) -> str | None:
    """Why the resources ``values`` cannot pack several seeds into one job, or None: a packed seed
    is one process, so a job of a multi-rank (DDP) run takes one seed."""
    k = values.get("seeds_per_gpu", 1)
    if not isinstance(k, int) or k <= 1:
        return None
    gpus, tasks, nodes = (values.get(key, default) for key, default in (("gpus", 0), ("tasks", 1), ("nodes", 1)))
    if nodes != 1 or (gpus or 0) > 1 or (not gpus and tasks != 1):
        return (f"seeds_per_gpu: {k} packs one-process seeds, but the job asks for {nodes} node(s), "
                f"{gpus or 0} GPU(s), {tasks} task(s) (packing needs nodes 1, gpus 0 or 1, tasks 1)")
    return None


def share_problem(values: dict[str, Any]) -> str | None:
    """Why the resources ``values`` cannot ask for a share of one GPU, or None: the share replaces
    the job's one GPU, so it needs gpus 1 on one node, and no ``extra`` GPU request beside it."""
    share = values.get("gpu_share", "")
    if not share:
        return None
    gpus, nodes = values.get("gpus", 0), values.get("nodes", 1)
    if gpus != 1 or nodes != 1:
        return (f"gpu_share: {share} is a share of one GPU, but the job asks for {nodes} node(s) x {gpus} GPU(s) "
                "(a share needs gpus 1, nodes 1)")
    clash = sorted(k for k in (values.get("extra") or {}) if str(k).replace("-", "_") in _GPU_OPTIONS)
    if clash:
        return f"gpu_share: {share} asks for the GPU itself; extra.{clash[0]} would ask again (drop one of them)"
    return None


# The ``extra`` options that also ask for GPUs: with a gpu_share they would ask twice.
_GPU_OPTIONS = frozenset({"gres", "gpus", "gpus_per_socket", "gpus_per_task"})


def check(values: dict[str, Any], where: str, section: str = "resources") -> None:
    """Raise :class:`ResourceError` ``"<where>: <section>.<key>: ..."`` for the first bad value."""
    for key, value in values.items():
        said = problem(str(key), value)
        if said:
            sep = "" if said.startswith(".") else ": "
            raise ResourceError(f"{where}: {section}.{key if isinstance(key, str) else clip(key)}{sep}{said}")


def check_job_name(name: Any, where: str) -> None:
    said = _name_problem(name, _JOB_NAME, "a job name (letters, digits and _.:/+=@-)")
    if said or not name:
        raise ResourceError(f"{where}: job name: {said or 'empty'}")


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
    # Seeds trained side by side in one job, each its own process on the job's one GPU (or, with
    # gpus 0, its CPUs): a job of k seeds asks for k x cpus_per_task CPUs and k x mem_gb.
    seeds_per_gpu: int = 1
    # "" = whole GPUs; "shard:N" / "mps:N" = SLURM's own GPU sharing (--gres=shard:N / mps:N in
    # place of the job's one GPU), so independent jobs share a GPU (docs/cluster.md).
    gpu_share: str = ""

    def __post_init__(self):
        check(asdict(self), "resources")
        said = pack_problem(asdict(self)) or share_problem(asdict(self))
        if said:
            raise ResourceError(f"resources: {said}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None, where: str, section: str = "resources") -> "Resources":
        """Resources from a row's / config's mapping, every value checked and named with ``where``."""
        values = dict(values or {})
        check(values, where, section)
        return cls(**values)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus if self.gpus > 0 else self.tasks
