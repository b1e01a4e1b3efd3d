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
        meta = json.loads(side.read_text(encoding="utf-8"))
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


# --------------------------------------------------------------------------- load-side validation
class CheckpointError(ValueError):
    """A checkpoint that verifies but does not fit this run; ``str()`` is one line with the way out."""


def _kind(value: Any) -> str:
    return type(value).__name__


def check_fits(state: Any, like: dict[str, Any], params: list[torch.Tensor], run_dir: str | Path) -> None:
    """A loaded checkpoint against the state this run saves (``like``, the trainer's own
    ``state_dict()``, and ``params``, its optimizer's parameters in order): every entry there, the
    model's tensors by name and shape, the optimizer's parameter groups and per-parameter buffers.
    Raises :class:`CheckpointError` naming the file, what is missing or mis-shaped, and the way
    out, instead of a KeyError or load_state_dict's many-line report."""
    run_dir = Path(run_dir)
    path = run_dir / LATEST if (run_dir / LATEST).is_file() else run_dir / PREVIOUS

    def unfit(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: does not fit this run ({what}); remove {LATEST} and {PREVIOUS} to train "
                               "from the start, or start without --resume in a new --output-dir")

    if not isinstance(state, dict):
        raise unfit(f"holds a {_kind(state)}, expected a checkpoint dict")
    missing = [k for k in like if k not in state]
    if missing:
        raise unfit(f"no {', '.join(repr(k) for k in missing[:4])} state")
    for key, ours in like.items():
        if isinstance(ours, dict) and not isinstance(state[key], dict):
            raise unfit(f"'{key}' is a {_kind(state[key])}, expected a dict")
    model, mine = state["model"], like["model"]
    absent = [k for k in mine if k not in model]
    extra = [k for k in model if k not in mine]
    if absent or extra:
        names = ", ".join(absent[:3]) if absent else ", ".join(extra[:3])
        raise unfit(f"model tensor(s) {'missing' if absent else 'unexpected'}: {names}"
                    + (f" and {len(absent or extra) - 3} more" if len(absent or extra) > 3 else ""))
    for name, tensor in mine.items():
        theirs = model[name]
        if not isinstance(theirs, torch.Tensor) or theirs.shape != tensor.shape:
            got = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else _kind(theirs)
            raise unfit(f"model tensor {name} is {got}, expected {tuple(tensor.shape)}")
    opt, my_opt = state["optimizer"], like["optimizer"]
    groups, my_groups = opt.get("param_groups"), my_opt["param_groups"]
    if not isinstance(groups, list) or not isinstance(opt.get("state"), dict) or \
            [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups] != \
            [len(g["params"]) for g in my_groups]:
        raise unfit("its optimizer's parameter groups differ from this model's")
    shapes = dict(zip((i for g in my_groups for i in g["params"]), (p.shape for p in params)))
    for index, buffers in opt["state"].items():
        for key, value in (buffers.items() if isinstance(buffers, dict) else ()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and index in shapes and value.shape != shapes[index]:
                raise unfit(f"optimizer buffer {key} of parameter {index} is {tuple(value.shape)}, "
                            f"expected {tuple(shapes[index])}")


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
