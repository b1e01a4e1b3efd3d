"""What a run records of the process that trained it (its env.json): versions, host, device,
threads, world size, and how the process was started. The launchers' own variables are read
here, outside the engine: the trainer is handed :func:`environment` and calls it."""
from __future__ import annotations

import os
import platform
import socket
from collections.abc import Mapping
from typing import Any

import torch

from imgclf import __version__
from imgclf.utils import InputError


def environment(device: torch.device, world_size: int, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """env.json's record of this process. ``pack`` and ``mps`` appear only when their variables
    are set (IMGCLF_PACK_SIZE: seeds trained in one process; IMGCLF_MPS=1: the GPU is shared
    through CUDA MPS), so a run started without them records what it always did."""
    import torchvision

    env = os.environ if env is None else env
    record = {"imgclf": __version__, "python": platform.python_version(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "host": socket.gethostname(), "device": str(device),
              "device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "world_size": world_size, "slurm_job_id": env.get("SLURM_JOB_ID"), "launcher": launcher(env)}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
    if env.get("IMGCLF_PACK_SIZE") is not None:
        record["pack"] = {"size": _integer(env, "IMGCLF_PACK_SIZE")}
    if env.get("IMGCLF_MPS") is not None:
        record["mps"] = env.get("IMGCLF_MPS") == "1"
    return record


def launcher(env: Mapping[str, str] | None = None) -> str:
    """How this process was started, read from what each launcher sets."""
    from imgclf.launch.base import started_by

    return started_by(os.environ if env is None else env)


def _integer(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"environment: {key}={raw!r} is not an integer") from None
