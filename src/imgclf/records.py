"""A seed's records: ``result.json`` (training complete) and ``eval.json`` (the seed's score).

One validated reader for both, shared by ``imgclf status``, ``imgclf table`` and the workflow:
a record that is not what imgclf writes (garbage, ``NaN``/``Infinity``, a missing key, a string
where a number belongs, a test error outside [0, 100], another config's result) is corrupt, and a
seed whose record is corrupt is not done: the workflow sets the record aside and trains it again.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from imgclf.utils import MAX_JSON_BYTES, InputError, clip, read_text

RESULT, EVAL = "result.json", "eval.json"
CORRUPT_SUFFIX = ".corrupt"


class RecordError(InputError):
    """A corrupt result.json/eval.json; ``str()`` is one line naming the file and what is wrong."""


class ForeignRecord(RecordError):
    """A well-formed record of another config (its ``config_hash``): not this run's result."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _number(data: dict[str, Any], key: str, *, low: float = 0.0, high: float = math.inf,
            null: bool = True) -> str | None:
    """Why ``data[key]`` is not a finite number in [low, high] (or null, where allowed); None if it is."""
    value = data.get(key)
    if value is None:
        return None if null else f"'{key}' is null, expected a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"'{key}' is {clip(value)}, expected a number"
    if not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        return f"'{key}' is {clip(value)}, expected a number {bounds}"
    return None


def _problem(data: dict[str, Any]) -> str | None:
    diverged = data.get("diverged", False)
    if not isinstance(diverged, bool):
        return f"'diverged' is {clip(diverged)}, expected true or false"
    if "test_error" not in data:
        return "missing key 'test_error'"
    why = _number(data, "test_error", high=100.0, null=diverged)
    for key in ("test_loss", "train_seconds", "wall_seconds"):
        why = why or _number(data, key)
    if why:
        return why
    for key, kind, name in (("seed", int, "an integer"), ("epochs", int, "an integer"),
                            ("config_hash", str, "a string")):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            return f"'{key}' is {clip(value)}, expected {name}"
    return None


def read(path: str | Path, expect_hash: str | None = None) -> dict[str, Any]:
    """A result.json or eval.json as imgclf writes it, or :class:`RecordError` saying why not.
    With ``expect_hash``, a record of another config (its ``config_hash``) is refused too."""
    path = Path(path)
    try:
        text = read_text(path, "a run record (a JSON object)", MAX_JSON_BYTES)
        data = json.loads(text, parse_constant=_refuse_constant)
    except InputError as e:
        raise RecordError(str(e)) from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON at line {e.lineno}, expected a run record") from None
    except ValueError as e:  # parse_constant: NaN, Infinity, -Infinity
        raise RecordError(f"{path}: holds {e}, expected finite numbers (JSON has no {e})") from None
    except RecursionError:
        raise RecordError(f"{path}: JSON nested too deeply, expected a run record") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: holds a JSON {type(data).__name__}, expected a run record (a JSON object)")
    why = _problem(data)
    if why:
        raise RecordError(f"{path}: corrupt run record: {why}")
    recorded = data.get("config_hash")
    if expect_hash is not None and recorded is not None and recorded != expect_hash:
        raise ForeignRecord(f"{path}: records config hash {clip(recorded)}, not this run's {expect_hash} "
                            "(another config's result)")
    return data


def read_seed(run_dir: str | Path, expect_hash: str | None = None) -> dict[str, Any] | None:
    """A seed's score: its eval.json (else its result.json), checked against its result.json for
    this config; None while the seed has neither. :class:`RecordError` for a corrupt record."""
    run_dir = Path(run_dir)
    result = read(run_dir / RESULT, expect_hash) if (run_dir / RESULT).is_file() else None
    if not (run_dir / EVAL).is_file():
        return result
    return {**read(run_dir / EVAL, expect_hash), "config_hash": (result or {}).get("config_hash")}


def corrupt(run_dir: str | Path) -> list[tuple[Path, str]]:
    """The seed's records that are corrupt, each with its one-line reason."""
    out = []
    for name in (RESULT, EVAL):
        path = Path(run_dir) / name
        if path.is_file():
            try:
                read(path)
            except (RecordError, OSError) as e:
                out.append((path, str(e)))
    return out


def set_aside(run_dir: str | Path) -> list[str]:
    """Rename the seed's corrupt records to ``<name>.corrupt`` so that the workflow trains the seed
    again (the job resumes from its last checkpoint); a corrupt result.json takes the eval.json
    scored from it along. Returns one line per record set aside. A well-formed record of another
    config is left in place (it is someone's result): the table and status never show it as this
    run's, and say which file it is."""
    run_dir = Path(run_dir)
    lines = []
    bad = corrupt(run_dir)
    names = {p.name for p, _ in bad}
    if RESULT in names and (run_dir / EVAL).is_file() and EVAL not in names:
        bad.append((run_dir / EVAL, f"{run_dir / EVAL}: scored from a corrupt {RESULT}"))
    for path, why in bad:
        os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
        lines.append(f"imgclf: {why}; set aside as {path.name}{CORRUPT_SUFFIX}, the seed is trained again")
    return lines
