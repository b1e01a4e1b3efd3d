"""What a run writes besides its checkpoints: train_log.csv (a row per epoch), the TensorBoard
events (train.use_tensorboard), and at the end model.pt and result.json (diverged.json too
when the loss diverged)."""
from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import torch

from imgclf import config as C
from imgclf.utils import atomic_write_bytes, atomic_write_text, write_json

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_seconds",
              "images_per_second"]


def write_log(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "train_log.csv", buf.getvalue())


def epoch_row(epoch: int, lr: float, accum: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The log's row of an epoch from its accumulated training sums and its evaluation."""
    seen, seconds = accum["seen"], accum["seconds"]
    return {"epoch": epoch, "lr": lr, "train_loss": accum["loss_sum"] / max(seen, 1),
            "train_error": 100.0 * (1 - accum["correct"] / max(seen, 1)),
            "test_loss": evaluation["test_loss"], "test_error": evaluation["test_error"], "epoch_seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else float("nan")}


def untrained_row(lr: float, evaluation: dict[str, Any]) -> dict[str, Any]:
    """train.val_first's epoch-0 row: the initial weights' score, no training yet."""
    nan = float("nan")
    return {"epoch": 0, "lr": lr, "train_loss": nan, "train_error": nan, "test_loss": evaluation["test_loss"],
            "test_error": evaluation["test_error"], "epoch_seconds": 0.0, "images_per_second": nan}


def short_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for prefix in ("NVIDIA ", "GeForce ", "Tesla "):
            name = name.replace(prefix, "")
        return name.split(" ")[0] if "H100" in name or "H200" in name or "A100" in name else name
    return "CPU"


def finished(cfg: C.Config, run_dir: Path, rows: list[dict[str, Any]], *, wall_seconds: float,
             device: torch.device, world_size: int, precision: str, n_params: int) -> dict[str, Any]:
    """result.json of a run trained to its last epoch, from its log (the last row's evaluation)."""
    last = rows[-1]
    return {"test_error": last["test_error"], "test_loss": last["test_loss"], "train_error": last["train_error"],
            "train_loss": last["train_loss"], "epochs": cfg.scheduler.epochs, "wall_seconds": wall_seconds,
            "train_seconds": sum(r["epoch_seconds"] for r in rows), "device": str(device),
            "gpu": short_device_name(device), "world_size": world_size, "precision": precision,
            "n_params": n_params, "seed": cfg.train.seed, "config_hash": C.config_hash(cfg),
            "run_id": run_dir.parent.name, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def diverged(cfg: C.Config, run_dir: Path, message: str, *, epoch: int, rollbacks: int, wall_seconds: float,
             device: torch.device, world_size: int, precision: str, n_params: int) -> dict[str, Any]:
    """result.json (and diverged.json) of a run whose loss diverged in ``epoch`` (1-based): the
    table shows it as diverged."""
    return {"diverged": True, "message": message, "test_error": None, "epochs": cfg.scheduler.epochs,
            "diverged_at_epoch": epoch, "rollbacks": rollbacks, "seed": cfg.train.seed,
            "config_hash": C.config_hash(cfg), "run_id": run_dir.parent.name, "wall_seconds": wall_seconds,
            "train_seconds": None, "gpu": short_device_name(device), "n_params": n_params,
            "world_size": world_size, "precision": precision}


def write_final(run_dir: Path, model: torch.nn.Module, result: dict[str, Any]) -> None:
    """model.pt, then result.json: its existence means "complete"."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(run_dir / "model.pt", buf.getvalue())
    write_json(run_dir / "result.json", result)


def write_diverged(run_dir: Path, result: dict[str, Any]) -> None:
    write_json(run_dir / "diverged.json", result)
    write_json(run_dir / "result.json", result)


class Board:
    """``train.use_tensorboard``: TensorBoard event files beside train_log.csv (rank 0) of the
    reference's per-epoch scalars (accuracies as fractions)."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.use_tensorboard: needs the tensorboard package (pip install tensorboard), "
                             "which is not installed; install it or set train.use_tensorboard False") from None
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

    @classmethod
    def of(cls, run_dir: Path, epoch: int, rows: list[dict[str, Any]]) -> "Board":
        """The board of a run about to train ``epoch`` (0-based) with log ``rows``: a resumed run
        drops the events written after its checkpoint; train.val_first's row is logged at once."""
        board = cls(run_dir, purge_step=epoch + 1 if epoch else None)
        if epoch == 0 and rows and rows[0]["epoch"] == 0:
            board.epoch(rows[0])
        return board

    def epoch(self, row: dict[str, Any]) -> None:
        step, w = row["epoch"], self.writer
        if step > 0:
            w.add_scalar("Train/Loss", row["train_loss"], step)
            w.add_scalar("Train/Acc1", 1 - row["train_error"] / 100, step)
            w.add_scalar("Train/Time", row["epoch_seconds"], step)
            w.add_scalar("Train/LearningRate", row["lr"], step)
        if math.isfinite(row["test_error"]):  # epochs without an evaluation log none
            w.add_scalar("Val/Loss", row["test_loss"], step)
            w.add_scalar("Val/Acc1", 1 - row["test_error"] / 100, step)
        w.flush()

    def close(self) -> None:
        self.writer.close()
