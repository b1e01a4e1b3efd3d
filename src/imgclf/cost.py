"""What training costs in GPU-hours: from a calibration file (the aggregate images per second that
k concurrent training processes reach on one GPU, measured by ``imgclf calibrate``) where it covers
a run, else from the reference README's reported training time.

k seeds packed on one GPU share it for the job's whole length, so one seed's GPU-hours at k are
``epochs x training images / aggregate_img_s(k) / 3600``: the GPU trains k seeds in the time it
takes one of them, and each seed is billed a k-th of that time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.utils import InputError, clip

FORMAT = 1
DEFAULT_PATH = "config/calibration.json"
# What an entry must match in a run's resolved config: the same model (its whole section), data,
# batch and precision. Anything else a row changes (augmentation, schedule) costs little per step.
ENTRY_KEYS = ("dataset", "model", "model_config", "batch_size", "precision", "k", "img_s")


@dataclass(frozen=True)
class Calibration:
    path: Path
    device: str
    torch: str
    date: str
    entries: tuple[dict[str, Any], ...]

    def img_s(self, config: dict[str, Any], k: int) -> float | None:
        """The measured aggregate img/s of ``k`` processes of this run's model, or None."""
        model = config["model"]["name"]
        for e in self.entries:
            if (e["k"] == k and e["dataset"] == config["dataset"]["name"] and e["model"] == model
                    and e["batch_size"] == config["train"]["batch_size"]
                    and e["precision"] == config["train"]["precision"]
                    and e["model_config"] == config["model"].get(model)):
                return float(e["img_s"])
        return None

    def describe(self) -> str:
        return f"calibration {self.path}: {self.device}, torch {self.torch}, {self.date}"


def load_calibration(path: str | Path | None) -> Calibration | None:
    """The calibration file at ``path``; None when ``path`` is empty or no file is there. A file
    that is there but unreadable is an error naming the file and what is wrong."""
    if not path:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a calibration file (JSON): {str(e).splitlines()[0]}; "
                         "write it again with `imgclf calibrate`") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping, got {clip(data)}; write it again with `imgclf calibrate`")
    if data.get("format") != FORMAT:
        raise InputError(f"{path}: format: expected {FORMAT}, got {clip(data.get('format'))}; "
                         "write it again with `imgclf calibrate`")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise InputError(f"{path}: entries: expected a list, got {clip(entries)}")
    for i, e in enumerate(entries):
        said = _entry_problem(e)
        if said:
            raise InputError(f"{path}: entries[{i}]: {said}")
    return Calibration(path, str(data.get("device", "?")), str(data.get("torch", "?")), str(data.get("date", "?")),
                       tuple(entries))


def _entry_problem(e: Any) -> str | None:
    if not isinstance(e, dict):
        return f"expected a mapping, got {clip(e)}"
    missing = [k for k in ENTRY_KEYS if k not in e]
    if missing:
        return f"missing key {missing[0]!r} (an entry has {', '.join(ENTRY_KEYS)})"
    rate = e["img_s"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        return f"img_s: expected a positive number, got {clip(rate)}"
    if isinstance(e["k"], bool) or not isinstance(e["k"], int) or e["k"] < 1:
        return f"k: expected a whole number >= 1, got {clip(e['k'])}"
    return None


def train_images(config: dict[str, Any]) -> int:
    """Images one epoch trains on: the training split, less the held-out validation share."""
    from imgclf import catalog

    n = catalog.DATASETS[config["dataset"]["name"]].split_sizes["train"]
    train = config["train"]
    if not train.get("use_test_as_val", True):
        n -= int(n * float(train.get("val_ratio", 0.0)))
    return n


@dataclass(frozen=True)
class SeedCost:
    """One seed's GPU-hours: at its run's seeds_per_gpu, at one seed per GPU, and the reference
    README's (its reported time x the job's GPUs); None where nothing says."""

    packed: float | None
    single: float | None
    reference: float | None
    measured: bool  # packed/single come from the calibration (else they are the reference's)


def seed_cost(config: dict[str, Any], resources: dict[str, Any], reported_hours: float | None,
              calibration: Calibration | None) -> SeedCost:
    gpus = int(resources.get("gpus", 1) or 1)
    reference = None if reported_hours is None else reported_hours * max(gpus, 1)
    k = int(resources.get("seeds_per_gpu", 1) or 1)
    one_gpu = gpus <= 1 and int(resources.get("nodes", 1) or 1) == 1  # DDP runs are not calibrated
    if calibration is not None and one_gpu:
        single, packed = calibration.img_s(config, 1), calibration.img_s(config, k)
        if single and packed:
            images = config["scheduler"]["epochs"] * train_images(config)
            return SeedCost(images / packed / 3600, images / single / 3600, reference, True)
    return SeedCost(reference, reference, reference, False)


def write_calibration(path: str | Path, *, device: str, torch_version: str, date: str, steps: int, warmup: int,
                      entries: list[dict[str, Any]]) -> None:
    from imgclf.utils import atomic_write_text

    head = {"format": FORMAT, "device": device, "torch": torch_version, "date": date, "steps": steps,
            "warmup": warmup}
    # one entry a line: the file is read by people too (which models, which k, what rate)
    lines = ",\n  ".join(json.dumps(e) for e in entries)
    atomic_write_text(path, json.dumps(head, indent=1)[:-2] + f',\n "entries": [\n  {lines}\n ]\n}}\n')
