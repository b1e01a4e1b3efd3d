"""Who am I in a distributed run, and which device is mine: pure functions of (environment
variables, number of visible CUDA devices), so every launcher case is a table test on a CPU.

Where the ranks come from, in order of trust:

1. a submitit job (``SUBMITIT_EXECUTOR`` = ``slurm`` or ``local``): the job's own SLURM /
   submitit variables. RANK, WORLD_SIZE or MASTER_* inherited from the submitting shell
   (a job launched from another job, a torchrun shell) are stale and are overwritten;
2. torchrun or any env:// launcher: RANK and WORLD_SIZE (LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*);
3. otherwise one process. SLURM variables alone (an interactive allocation, snakemake running
   inside a job) never make a process a rank: N copies would train into one run directory.

The device is ``cuda:<local rank>`` when every task sees all of the node's GPUs, and ``cuda:0``
when SLURM/submitit binds one GPU per task (its CUDA_VISIBLE_DEVICES holds one id, renumbered
0); CUDA_VISIBLE_DEVICES is never rewritten here.
"""
from __future__ import annotations

import itertools
import logging
import random
import re
import shutil
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)
# The rendezvous port, drawn from the job id so every task of a job agrees without talking. The
# range sits below Linux's ephemeral ports (32768-60999 by default): a port there can be taken at
# any moment by some process's outgoing connection, and the rendezvous would fail to bind.
MIN_PORT, MAX_PORT = 15000, 32767
# Well-known listeners inside that range: torch's default rendezvous ports (a torchrun on the same
# node), RabbitMQ's management UI, GlusterFS, MongoDB.
RESERVED_PORTS = frozenset({15672, 24007, 24008, 27017, 27018, 27019, 28017, 29400, 29500})
EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # single | torchrun | submitit-slurm | submitit-local

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment: {key} is not set but the launcher needs it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment: {key}={raw!r} is not an integer") from None


def hostnames(nodelist: str) -> list[str]:
    """Every hostname of a SLURM hostlist, in SLURM's order: 'gpu[07-08,11],cpu01' ->
    gpu07 gpu08 gpu11 cpu01. A host may hold several bracket groups ('rack[1-2]-n[01-02]' ->
    rack1-n01 rack1-n02 rack2-n01 rack2-n02); a range keeps its start's zero padding."""
    text = nodelist.strip()
    bad = ValueError(f"environment: SLURM_JOB_NODELIST={nodelist!r} is not a SLURM hostlist")
    if not text:
        raise bad
    hosts: list[str] = []
    for host in re.findall(r"(?:[^,\[\]]|\[[^\[\]]*\])+", text):
        # Literal text and bracket groups alternate; each group is one axis of a product.
        parts = re.split(r"\[([^\[\]]*)\]", host)
        axes = [[p] if i % 2 == 0 else _expand_ranges(p, bad) for i, p in enumerate(parts)]
        hosts.extend("".join(names) for names in itertools.product(*axes))
    # Whatever the pattern above skipped (an unbalanced bracket, an empty entry) is malformed.
    if ",".join(re.findall(r"(?:[^,\[\]]|\[[^\[\]]*\])+", text)) != text:
        raise bad
    return hosts


def _expand_ranges(ranges: str, bad: ValueError) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']."""
    out: list[str] = []
    for item in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise bad
        lo, hi = m.group(1), m.group(2) or m.group(1)
        out.extend(str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1))
    return out


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM hostlist: SLURM's own ``scontrol show hostnames`` where it
    is installed (it knows every syntax SLURM accepts), else :func:`hostnames`."""
    scontrol = shutil.which("scontrol")
    if scontrol and nodelist.strip():
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist.strip()], capture_output=True,
                                 text=True, timeout=10)
            names = out.stdout.split()
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass  # the parser below reads the same hostlists
    return hostnames(nodelist)[0]


def job_port(job_id: str) -> int:
    draws = random.Random(job_id)
    while True:
        port = draws.randint(MIN_PORT, MAX_PORT)
        if port not in RESERVED_PORTS:
            return port


def resolve(env: Mapping[str, str]) -> DistEnv:
    """The rank, world and rendezvous of this process (see the module's docstring)."""
    from imgclf.launch.base import rendezvous

    source = rendezvous(env)  # which launcher's job variables this process has, if any
    if source == "submitit-slurm":
        world = _int(env, "SLURM_NTASKS", 1)
        nodes = _int(env, "SLURM_JOB_NUM_NODES", 1)
        if world % nodes:
            raise ValueError(f"environment: SLURM_NTASKS={world} is not a multiple of SLURM_JOB_NUM_NODES={nodes}")
        port = _int(env, "IMGCLF_MASTER_PORT", job_port(env["SLURM_JOB_ID"]))
        return DistEnv(rank=_int(env, "SLURM_PROCID", 0), world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
                       local_world_size=world // nodes, master_addr=first_host(env.get("SLURM_JOB_NODELIST", "")
                                                                                or "localhost"),
                       master_port=port, source="submitit-slurm")
    if source == "submitit-local":
        world = _int(env, "SUBMITIT_LOCAL_NTASKS", 1)
        return DistEnv(rank=_int(env, "SUBMITIT_LOCAL_GLOBALID", 0), world_size=world,
                       local_rank=_int(env, "SUBMITIT_LOCAL_LOCALID", 0), local_world_size=world,
                       master_addr="127.0.0.1",
                       master_port=_int(env, "IMGCLF_MASTER_PORT", job_port(env["SUBMITIT_LOCAL_JOB_ID"])),
                       source="submitit-local")
    world = _int(env, "WORLD_SIZE", 1)
    if world > 1:
        rank = _int(env, "RANK")
        return DistEnv(rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK", rank),
                       local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
                       master_addr=env.get("MASTER_ADDR") or "127.0.0.1", master_port=_int(env, "MASTER_PORT", 29500),
                       source="torchrun")
    return DistEnv()


def export(d: DistEnv, env: MutableMapping[str, str]) -> list[str]:
    """Write the env:// variables of ``d`` into ``env``; returns the stale ones it replaced
    (with their old values), so the caller can say so. CUDA_VISIBLE_DEVICES is left alone."""
    new = {"RANK": str(d.rank), "WORLD_SIZE": str(d.world_size), "LOCAL_RANK": str(d.local_rank),
           "LOCAL_WORLD_SIZE": str(d.local_world_size), "MASTER_ADDR": d.master_addr,
           "MASTER_PORT": str(d.master_port)}
    replaced = [f"{k}={env[k]}" for k in EXPORTED if k in env and env[k] != new[k]]
    env.update(new)
    return replaced


def device(requested: str, d: DistEnv, n_visible: int) -> str:
    """The device this rank trains on, as a string: 'cpu', 'mps' or 'cuda:<visible index>'.

    ``requested`` is the config's ``device`` (auto | cpu | mps | cuda | cuda:K)."""
    if requested in ("cpu", "mps"):
        return requested
    if requested == "auto" and n_visible == 0:
        return "cpu"
    if n_visible == 0:
        raise ValueError(f"device: '{requested}' requested but no CUDA device is visible (use auto or cpu)")
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if d.local_world_size > 1:
            raise ValueError(f"device: '{requested}' names one GPU but {d.local_world_size} ranks share this node; "
                             "use cuda or auto")
        if index >= n_visible:
            raise ValueError(f"device: '{requested}' is not visible ({n_visible} CUDA device(s): cuda:0.."
                             f"cuda:{n_visible - 1})")
        return requested
    if n_visible >= d.local_world_size:
        return f"cuda:{d.local_rank}"
    if n_visible == 1:  # one GPU bound per task (srun --gpus-per-task / gpu-bind): it is cuda:0
        return "cuda:0"
    raise ValueError(f"device: {d.local_world_size} ranks on this node but {n_visible} visible CUDA devices; "
                     "give each rank one GPU (gpus = tasks per node) or check CUDA_VISIBLE_DEVICES")


def backend(requested: str, device_type: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device_type == "cuda" else "gloo"


def per_rank_batch(batch_size: int, world_size: int, subdivision: int = 1) -> int:
    """Each rank's share of the global batch; the global batch is what the recipe means."""
    if batch_size % (world_size * subdivision):
        raise ValueError(f"train.batch_size {batch_size} is not divisible by world size {world_size} x "
                         f"train.subdivision {subdivision}; choose a batch size that is a multiple of "
                         f"{world_size * subdivision} or another GPU count")
    return batch_size // world_size


def current(cfg_device: str) -> tuple[DistEnv, "torch.device"]:  # noqa: F821 - torch imported lazily
    """This process's DistEnv and device, from os.environ and the CUDA devices it can see."""
    import os

    import torch

    d = resolve(os.environ)
    if cfg_device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device: 'mps' requested but MPS is not available (use auto or cpu)")
    n_visible = torch.cuda.device_count() if cfg_device not in ("cpu", "mps") else 0
    return d, torch.device(device(cfg_device, d, n_visible))


def check_world_size(requested: int, launched: int) -> None:
    """train.dist.world_size (0: any) against the processes launched: the world size is part of
    the run's identity (BN statistics are per rank)."""
    if requested > 0 and requested != launched:
        raise ValueError(f"train.dist.world_size is {requested} but {launched} "
                         "process(es) were launched; use launcher local/slurm with that many tasks or GPUs")


def init_process_group(dist_cfg, d: DistEnv, device) -> None:
    """env:// process group of ``d`` (the launcher exported MASTER_ADDR/PORT); ``dist_cfg``: the
    config's train.dist."""
    import torch
    import torch.distributed as dist

    if not d.distributed or dist.is_initialized():
        return
    name = backend(dist_cfg.backend, device.type)
    if name == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=name, init_method=dist_cfg.init_method, rank=d.rank, world_size=d.world_size)
