"""Deterministic fault injection for the reliability tests.

``IMGCLF_FAULT=<phase>:<n>`` makes the process SIGKILL itself at the n-th (1-based)
occurrence of ``phase``: ``step`` (inside a training step, after backward, before the
optimizer step), ``eval`` (inside evaluation) or ``checkpoint`` (while a checkpoint is being
written: its sidecar is on disk, the file is not). Unset, this costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def point(phase: str) -> None:
    spec = os.environ.get("IMGCLF_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != phase:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
