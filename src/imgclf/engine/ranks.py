"""What the ranks of a run agree on: when to stop, and whether a step every rank takes at the same
point (a write, a read) failed on any of them. The agreements travel on the host: a gloo group of
CPU tensors, whatever the training backend, so reading them never waits for the device."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# With several ranks only global rank 0 hears a stop request (a cluster's warning signal reaches
# rank 0 alone), so the ranks agree on a stop every STOP_CHECK_STEPS steps: each check starts an
# asynchronous all-reduce of the stop flag on a CPU process group and reads the one the previous
# check started, so no rank waits for it and the device never syncs for it, and every rank stops
# at the same step (the check after the one that saw the request).
STOP_CHECK_STEPS = 10


class RankFailed(RuntimeError):
    """Another rank failed; raised on every rank but that one, with its cause on one line."""


class Ranks:
    def __init__(self, run_dir: Path, world_size: int):
        self.run_dir, self.world_size = run_dir, world_size
        self.control = dist.new_group(backend="gloo") if world_size > 1 else None
        self._stop_vote: tuple[Any, torch.Tensor] | None = None  # (work, flag) of the last check

    def stop_requested(self, step: int, stop_event: threading.Event) -> bool:
        if self.world_size == 1:
            return stop_event.is_set()
        if step % STOP_CHECK_STEPS:
            return False
        stop = False
        if self._stop_vote is not None:  # started STOP_CHECK_STEPS steps ago: long done
            work, flag = self._stop_vote
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
            self._stop_vote = None
        if not stop:  # (every rank read the same flag, so every rank starts the next vote or none)
            flag = torch.tensor([float(stop_event.is_set())])
            self._stop_vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control, async_op=True),
                               flag)
        return stop

    def end_stop_vote(self) -> None:
        """Wait for the vote in flight: every rank started it, so it completes at once."""
        if self._stop_vote is not None:
            self._stop_vote[0].wait()
            self._stop_vote = None

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor, on the training backend), or ``t`` itself on one."""
        if self.world_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def together(self, action: Callable[[], T], what: str) -> T:
        """Run ``action`` (this rank's side of a step every rank takes at the same point: rank 0's
        writes, each rank's reads) and return its result; if it raised on any rank, every rank
        raises here, together: the failed rank its own exception, the others RankFailed with the
        cause on one line. A rank that raised alone would leave the others waiting in their next
        collective until the process group's timeout."""
        error: Exception | None = None
        result = None
        try:
            result = action()
        except Exception as e:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = e
        if self.world_size > 1:
            failed = torch.tensor([float(error is not None)])
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.control)
            if failed.item():
                causes: list[str | None] = [None] * self.world_size
                cause = f"{type(error).__name__}: {error}".replace("\n", " ") if error is not None else None
                dist.all_gather_object(causes, cause, group=self.control)
                if error is None:
                    rank, cause = next((r, c) for r, c in enumerate(causes) if c is not None)
                    raise RankFailed(f"{self.run_dir}: rank {rank} failed {what}: {cause}")
        if error is not None:
            raise error
        return result
