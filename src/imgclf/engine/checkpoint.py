"""Atomic, verified checkpoints.

``checkpoint.pt`` is written to a temp file and renamed; the previous one is kept as
``checkpoint.prev.pt``. Beside each, ``<name>.json`` records its size and SHA-256, so a
truncated or corrupted file is detected and the previous checkpoint used instead.
Loading is always ``weights_only=True``.

:class:`BackgroundWriter` writes them from a CPU copy on a thread of its own, so the training
(and every other rank, waiting for rank 0 in its next collective) does not stop while a large
model's checkpoint is serialised, hashed and fsynced.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from imgclf.utils import atomic_write_bytes, atomic_write_text

from . import faults

log = logging.getLogger(__name__)
LATEST, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    latest, prev = run_dir / LATEST, run_dir / PREVIOUS
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    meta = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "epoch": state.get("epoch"),
            "step": state.get("step_in_epoch")}
    if latest.is_file() and _verify(latest):
        # Rotate: the current latest (verified) becomes the previous one, with its sidecar.
        os.replace(latest, prev)
        if _sidecar(latest).is_file():
            os.replace(_sidecar(latest), _sidecar(prev))
    # The sidecar goes first: a checkpoint without a matching sidecar is never trusted.
    atomic_write_text(_sidecar(latest), json.dumps(meta))
    faults.point("checkpoint")
    atomic_write_bytes(latest, data)
    return latest


def _verify(path: Path) -> bool:
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    if path.stat().st_size != meta.get("bytes"):
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == meta.get("sha256")


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest checkpoint that verifies, or None. Warns when it falls back."""
    run_dir = Path(run_dir)
    for i, name in enumerate((LATEST, PREVIOUS)):
        path = run_dir / name
        if not path.exists():
            continue
        if _verify(path):
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file means "try the previous one"
                log.warning("%s: unreadable (%s); trying the previous checkpoint", path, e)
                continue
            if i:
                log.warning("%s: using the previous checkpoint (epoch %s) because %s failed verification",
                            path, state.get("epoch"), LATEST)
            return state
        log.warning("%s: size/hash does not match %s (truncated or corrupted); ignoring it", path,
                    _sidecar(path).name)
    return None


# Below this many bytes of tensors a checkpoint is written in the calling thread: it takes
# milliseconds, and a kill then finds exactly the checkpoints the run has passed.
BACKGROUND_MIN_BYTES = 32 << 20


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed; raised at the next checkpoint point."""


def cpu_copy(state: Any) -> Any:
    """``state`` with every tensor copied to the CPU (a copy even when it is there already, as
    the training goes on changing the originals in place) and every container rebuilt."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return state


def tensor_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


class BackgroundWriter:
    """One checkpoint write in flight at a time, each by :func:`save` (same atomicity, sidecar
    and rotation) from a CPU copy taken when it is submitted.

    :meth:`submit` first waits for the previous write; :meth:`wait` blocks until the pending one
    is on disk. A write that failed raises :class:`CheckpointWriteError` (one line) from the
    next :meth:`submit` or :meth:`wait`: the run stops at its next checkpoint point, not later.
    """

    def __init__(self, run_dir: str | Path, min_bytes: int | None = None):
        self.run_dir = Path(run_dir)
        self.min_bytes = BACKGROUND_MIN_BYTES if min_bytes is None else min_bytes
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, state: dict[str, Any], after: Callable[[], None] | None = None) -> None:
        """Write ``state`` (then call ``after``, e.g. the log that belongs to it) in the background."""
        self.wait()
        snapshot = cpu_copy(state)
        if tensor_bytes(snapshot) < self.min_bytes:
            self._write(snapshot, after)
            self.wait()
            return
        self._thread = threading.Thread(target=self._write, args=(snapshot, after), name="imgclf-checkpoint")
        self._thread.start()

    def _write(self, state: dict[str, Any], after: Callable[[], None] | None) -> None:
        try:
            save(self.run_dir, state)
            if after is not None:
                after()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        """Block until the pending write is done; raise (or, with ``raise_error`` False, log) its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is None:
            return
        first = (str(error).strip().splitlines() or [""])[0][:200]
        message = (f"{self.run_dir / LATEST}: writing the checkpoint failed "
                   f"({type(error).__name__}: {first}); the previous checkpoint is intact")
        if not raise_error:
            log.error("%s", message)
            return
        raise CheckpointWriteError(message) from error
