"""Atomic, verified checkpoints.

``checkpoint.pt`` is written to a temp file and renamed; the previous one is kept as
``checkpoint.prev.pt``. Beside each, ``<name>.json`` records its size and SHA-256, so a
truncated or corrupted file is detected and the previous checkpoint used instead.
Loading is always ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

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
