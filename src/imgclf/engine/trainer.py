"""The training engine: one run directory in, ``result.json`` out.

A run is a pure function of its resolved ``config.yaml`` (seed included) on CPU:
every random draw comes from a generator seeded by (seed, epoch, step), so a run
resumed from any checkpoint, at an epoch boundary or mid-epoch, ends bit-identical
to an uninterrupted one. This module is the loop: the batches come from
:mod:`.batches`, the step is :mod:`.step`'s, the model from :mod:`.assembly`, the
ranks' agreements from :mod:`.ranks`, the files it writes from :mod:`.results`.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from imgclf import config as C, runtime
from imgclf.augment.pipeline import EvalTransform, TrainTransform
from imgclf.data import derive_seed, load as load_data
from imgclf.runs import load_run_config
from imgclf.utils import write_json

from . import assembly, checkpoint as ckpt, distenv, faults, results
from .batches import BatchSource, training_split, validation_split  # noqa: F401 - validation_split: re-exported
from .evaluator import evaluate
from .precision import Precision, apply_backend_flags, backend_flags, guard_fused_first_step
from .ranks import STOP_CHECK_STEPS, RankFailed, Ranks  # noqa: F401 - re-exported
from .results import LOG_FIELDS  # noqa: F401 - re-exported
from .step import Step

log = logging.getLogger(__name__)


class Preempted(RuntimeError):
    """Training stopped on request (preemption or a time limit) after a checkpoint was written."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Trainer:
    """``environment(device, world_size)``: env.json's record of the process (default
    :func:`imgclf.runtime.environment`)."""

    def __init__(self, run_dir: str | Path, *, progress: bool | None = None,
                 stop_event: threading.Event | None = None, saved_event: threading.Event | None = None,
                 environment: Callable[[torch.device, int], dict[str, Any]] = runtime.environment):
        self.run_dir = Path(run_dir)
        self.cfg = cfg = load_run_config(self.run_dir)
        self.stop_event = stop_event or threading.Event()
        self.saved_event = saved_event or threading.Event()
        self.environment = environment
        self.dist_env, self.device = distenv.current(cfg.device)
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        distenv.per_rank_batch(cfg.train.batch_size, self.world_size, cfg.train.subdivision)
        distenv.init_process_group(cfg.train.dist, self.dist_env, self.device)
        self.ranks = Ranks(self.run_dir, self.world_size)
        distenv.check_world_size(cfg.train.dist.world_size, self.world_size)
        self.is_main = self.rank == 0
        if self.device.type == "cpu":  # the resolved config's thread count, whatever the job's CPUs
            torch.set_num_threads(cfg.train.threads)
        self.precision = precision = Precision(C.precision(cfg), self.device)
        self.backend_flags = backend_flags(precision.name, self.device.type, cfg.train.deterministic)
        apply_backend_flags(self.backend_flags)
        self.progress = self.is_main if progress is None else (progress and self.is_main)

        self.data = data = load_data(cfg.dataset.name, root=cfg.data_root, folder=cfg.dataset.dataset_dir or None)
        self.n_classes = cfg.dataset.n_classes or data.n_classes
        parts = assembly.assemble(cfg, self.run_dir, in_channels=data.n_channels, n_classes=self.n_classes,
                                  device=self.device, precision=precision, world_size=self.world_size)
        self.model, self.n_params, self.channels_last = parts.model, parts.n_params, parts.channels_last
        self.loader, held_out = training_split(cfg, data, self.device)
        from imgclf.optim import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(cfg, parts.train_model)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.loader))
        self.scaler = precision.make_scaler()
        guard_fused_first_step(self.optimizer)
        self.train_transform = TrainTransform(cfg.augmentation, *data.normalization, self.n_classes,
                                              data.image_size, self.device)
        self.eval_transform = EvalTransform(*data.normalization, self.device)
        self.test_images = data.test_images.to(self.device)
        self.test_labels = data.test_labels.to(self.device)
        self.val_images, self.val_labels = held_out or (self.test_images, self.test_labels)
        if parts.compiled:
            batch = cfg.train.batch_size // self.world_size // cfg.train.subdivision
            assembly.compile_probe(parts, (batch, data.n_channels, data.image_size, data.image_size), precision,
                                   self.optimizer)
        self.ddp_model, self.step_model = parts.ddp_model, parts.step_model
        self.batches = BatchSource(cfg, self.loader, self.train_transform, data, self.n_classes, precision,
                                   self.device, rank=self.rank, world_size=self.world_size,
                                   channels_last=self.channels_last)
        self.step = Step.of(cfg, self.model, parts.step_model, self.optimizer, self.scheduler, precision,
                            scaler=self.scaler, channels_last=self.channels_last,
                            ddp=parts.ddp_model if self.world_size > 1 else None)

        # Progress state (restored from a checkpoint on resume).
        self.epoch = 0  # the epoch being (or next to be) trained, 0-based
        self.step_in_epoch = 0
        self.accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.log_rows: list[dict[str, Any]] = []
        self.wall_seconds = 0.0
        self.rollbacks = 0
        self.checkpoints = ckpt.BackgroundWriter(self.run_dir)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "accum": dict(self.accum),
                "log_rows": list(self.log_rows), "wall_seconds": self.wall_seconds, "rollbacks": self.rollbacks,
                "config_hash": C.config_hash(self.cfg), "seed": self.cfg.train.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config_hash") != C.config_hash(self.cfg) or state.get("seed") != self.cfg.train.seed:
            raise ValueError(f"{self.run_dir}: checkpoint belongs to a different config or seed; "
                             "use a fresh output directory")
        ckpt.check_fits(state, self.state_dict(), [p for g in self.optimizer.param_groups for p in g["params"]],
                        self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.accum = dict(state["accum"])
        self.log_rows = list(state["log_rows"])
        self.wall_seconds = state["wall_seconds"]
        self.rollbacks = state.get("rollbacks", 0)

    def save_checkpoint(self, wait: bool = False) -> None:
        """Rank 0 hands the state to the background writer (a CPU copy: the training goes on
        while it is serialised, hashed and fsynced) and train_log.csv follows it to disk.
        ``wait``: return once both are on disk. A failed write (this one's or the previous
        background one's) stops every rank here, together."""
        def write():
            if self.is_main:
                rows = list(self.log_rows)
                self.checkpoints.submit(self.state_dict(), after=lambda: results.write_log(self.run_dir, rows))
                if wait:
                    self.checkpoints.wait()

        self.ranks.together(write, "writing the checkpoint")

    def _read_checkpoint(self) -> dict[str, Any] | None:
        def read():
            self.checkpoints.wait()
            return ckpt.load_latest(self.run_dir, map_location=self.device)

        return self.ranks.together(read, "reading the checkpoint")

    def resume(self) -> bool:
        state = self._read_checkpoint()
        if state is None:
            return False
        self.load_state_dict(state)
        if self.is_main:  # drop rows written after this checkpoint: the log never duplicates
            results.write_log(self.run_dir, self.log_rows)
        return True

    # ------------------------------------------------------------------ training
    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _train_epoch(self, bar) -> None:
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        t0 = time.perf_counter()
        for step, make_batch in self.batches.epoch(self.epoch, self.step_in_epoch):
            if self.ranks.stop_requested(step, self.stop_event):
                self._flush_accum(loss_sum, correct, seen, t0)
                self.save_checkpoint(wait=True)  # on disk before whoever waits for saved_event hears of it
                message = f"{self.run_dir}: stopped at epoch {self.epoch + 1} step {step}; checkpoint saved"
                if self.is_main:
                    log.warning("%s", message)  # in the job's log: where the requeued job resumes
                self.saved_event.set()
                raise Preempted(message)
            # Dropout / shake-shake draw from the global generator: reseeded per (epoch, step).
            torch.manual_seed(derive_seed(self.cfg.train.seed, self.epoch, step))
            batch = make_batch()
            loss, n_correct = self.step(batch)
            loss_sum += loss.double() * len(batch)
            correct += n_correct
            seen += len(batch)
            self.step_in_epoch = step + 1
            if bar is not None:
                bar.update(1)
            if (step + 1) % self.cfg.train.log_period == 0:
                self._check_finite(loss_sum, step)
        self._check_finite(loss_sum, len(self.loader) - 1)
        self._flush_accum(loss_sum, correct, seen, t0)

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        # Every rank checks at the same steps and sees the sum over ranks (non-finite if any
        # rank's is): they raise together, instead of one raising while the others hang in
        # the next all-reduce until the job's time limit.
        value = float(self.ranks.total(loss_sum).item())
        if not math.isfinite(value):
            raise Diverged(f"{self.run_dir}: training loss became {value} in epoch {self.epoch + 1}, "
                           f"by step {step + 1} (lr {self._lr():.4g})")

    def _flush_accum(self, loss_sum, correct, seen, t0) -> None:
        if self.world_size > 1:
            t = self.ranks.total(torch.stack([loss_sum.double(), correct.double(),
                                              torch.tensor(float(seen), device=self.device, dtype=torch.float64)]))
            loss_sum, correct, seen = t[0], t[1], int(t[2].item())
        self.accum["loss_sum"] += float(loss_sum.item())
        self.accum["correct"] += int(correct.item())
        self.accum["seen"] += seen
        self.accum["seconds"] += time.perf_counter() - t0

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        epochs = cfg.scheduler.epochs
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.environment(self.device, self.world_size), "precision": self.precision.name,
               **self.backend_flags}
        self.ranks.together(lambda: self.is_main and write_json(self.run_dir / "env.json", env), "writing env.json")
        started = time.perf_counter()
        wall_before = self.wall_seconds
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=epochs * len(self.loader), initial=self.epoch * len(self.loader) + self.step_in_epoch,
                       desc=self.run_dir.parent.name + "/" + self.run_dir.name, unit="step", mininterval=1.0,
                       dynamic_ncols=True, leave=False, disable=None)
        evaluation: dict[str, Any] = {}
        if self.epoch == 0 and self.step_in_epoch == 0 and not (self.run_dir / ckpt.LATEST).exists():
            if cfg.train.val_first:  # the initial weights' score: an epoch-0 row of the log
                evaluation = self._evaluate()
                self.log_rows.append(results.untrained_row(self._lr(), evaluation))
            self.save_checkpoint()  # the initial state: what a divergence in epoch 1 rolls back to
        board = results.Board.of(self.run_dir, self.epoch, self.log_rows) \
            if self.cfg.train.use_tensorboard and self.is_main else None
        try:
            while self.epoch < epochs:
                try:
                    self._train_epoch(bar)
                except Diverged as e:
                    if not self._roll_back(e):
                        return self._diverged(e)
                    continue
                last = self.epoch + 1 == epochs
                if last or (self.epoch + 1) % cfg.train.val_period == 0:
                    evaluation = self._evaluate()
                else:
                    evaluation = {"test_loss": float("nan"), "test_error": float("nan")}
                row = results.epoch_row(self.epoch + 1, self._lr(), self.accum, evaluation)
                self.log_rows.append(row)
                if board is not None:
                    board.epoch(row)
                if bar is not None:
                    bar.set_postfix(epoch=row["epoch"], loss=f"{row['train_loss']:.3f}",
                                    test_err=f"{row['test_error']:.2f}")
                self.epoch += 1
                self.step_in_epoch = 0
                self.accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
                self.wall_seconds = wall_before + time.perf_counter() - started
                if last or self.epoch % cfg.train.checkpoint_period == 0:
                    self.save_checkpoint()
            self.ranks.together(self.checkpoints.wait, "writing the checkpoint")
        finally:
            if bar is not None:
                bar.close()
            if board is not None:
                board.close()
            self.checkpoints.wait(raise_error=False)  # a crash still leaves the pending checkpoint
        self.ranks.end_stop_vote()
        self.wall_seconds = wall_before + time.perf_counter() - started
        return self._finish()

    def _roll_back(self, error: Diverged) -> bool:
        """``train.on_divergence rollback``: reload the last checkpoint and scale the lr down."""
        cfg = self.cfg.train
        if cfg.on_divergence != "rollback" or self.rollbacks >= cfg.max_rollbacks:
            return False
        state = self._read_checkpoint()
        if state is None:
            return False
        rollbacks = self.rollbacks + 1
        self.load_state_dict(state)
        self.rollbacks = rollbacks
        self.scheduler.base_lrs = [b * cfg.rollback_lr_factor for b in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
            group["lr"] = lr
        log.warning("%s; rollback %d/%d to epoch %d with the lr scaled by %g", error, rollbacks,
                    cfg.max_rollbacks, self.epoch, cfg.rollback_lr_factor ** rollbacks)
        return True

    def _facts(self) -> dict[str, Any]:
        return {"wall_seconds": self.wall_seconds, "device": self.device, "world_size": self.world_size,
                "precision": self.precision.name, "n_params": self.n_params}

    def _diverged(self, error: Diverged) -> dict[str, Any]:
        """A diverged run is finished: result.json says so, and the table shows it as diverged."""
        result = results.diverged(self.cfg, self.run_dir, str(error), epoch=self.epoch + 1,
                                  rollbacks=self.rollbacks, **self._facts())
        self.ranks.end_stop_vote()
        self.ranks.together(lambda: self.is_main and results.write_diverged(self.run_dir, result),
                            "writing diverged.json")
        log.error("%s", error)
        return result

    def _evaluate(self, test: bool = False) -> dict[str, Any]:
        """The validation set's loss and error (the test set unless train.use_test_as_val is
        False); ``test``: the test set's."""
        faults.point("eval")
        images, labels = (self.test_images, self.test_labels) if test else (self.val_images, self.val_labels)
        return evaluate(self.model, images, labels, self.eval_transform,
                        batch_size=self.cfg.validation.batch_size, precision=self.precision, rank=self.rank,
                        world_size=self.world_size, channels_last=self.channels_last)

    def _finish(self) -> dict[str, Any]:
        result = results.finished(self.cfg, self.run_dir, self.log_rows, **self._facts())
        if not self.cfg.train.use_test_as_val:  # the log scored the held-out split; the result is the test set's
            last, test = self.log_rows[-1], self._evaluate(test=True)
            result.update(val_error=last["test_error"], val_loss=last["test_loss"], test_error=test["test_error"],
                          test_loss=test["test_loss"])
        self.ranks.together(lambda: self.is_main and results.write_final(self.run_dir, self.model, result),
                            "writing the model and result.json")
        return result


def train(run_dir: str | Path, *, resume: bool = True, progress: bool | None = None,
          stop_event: threading.Event | None = None,
          environment: Callable[[torch.device, int], dict[str, Any]] = runtime.environment) -> dict[str, Any]:
    """Train the run in ``run_dir`` (which holds config.yaml) to completion; returns result.json's dict.

    The process group goes on every way out, a failure to build the trainer or to resume included:
    a rank that ends tears down its connections, so the other ranks' collectives fail at once
    instead of waiting for the group's timeout."""
    try:
        trainer = Trainer(run_dir, progress=progress, stop_event=stop_event, environment=environment)
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
