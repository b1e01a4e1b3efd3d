"""The training engine: one run directory in, ``result.json`` out.

A run is a pure function of its resolved ``config.yaml`` (seed included) on CPU:
every random draw comes from a generator seeded by (seed, epoch, step), so a run
resumed from any checkpoint, at an epoch boundary or mid-epoch, ends bit-identical
to an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
import platform
import socket
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from imgclf import __version__, config as C
from imgclf.augment.dual_cutout import per_view_model
from imgclf.augment.pipeline import EvalTransform, TrainTransform
from imgclf.data import DeviceLoader, derive_seed, load as load_data
from imgclf.models import build as build_model
from imgclf.runs import load_run_config
from imgclf.utils import atomic_write_text, write_json

from . import checkpoint as ckpt, distenv, faults
from .evaluator import evaluate, use_channels_last
from .precision import Precision, apply_backend_flags, backend_flags, guard_fused_first_step

log = logging.getLogger(__name__)
# With several ranks only global rank 0 hears SLURM's warning signal (submitit checkpoints on
# rank 0 alone), so the ranks agree on a stop every STOP_CHECK_STEPS steps: each check starts an
# asynchronous all-reduce of the stop flag on a CPU process group and reads the one the previous
# check started, so no rank waits for it and the device never syncs for it, and every rank stops
# at the same step (the check after the one that saw the request).
STOP_CHECK_STEPS = 10
# train.epoch_augmentation_draws batched: samples per per-sample transform call (whole global
# batches; a fixed number, so the draws do not depend on the memory budget). 16384 makes a CIFAR
# epoch in 4 calls; its float32 intermediates stay around 1 GB.
BATCHED_CHUNK_SAMPLES = 16384
LOG_FIELDS = ["epoch", "lr", "train_loss", "train_error", "test_loss", "test_error", "epoch_seconds",
              "images_per_second"]


# train.compile's caches (inductor's FX graphs and generated kernels, Triton's autotuning results)
# go into the run directory unless the user chose a folder before imgclf was imported.
COMPILE_CACHE = "compile_cache"
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def use_run_compile_cache(run_dir: Path) -> Path:
    """Point inductor's cache at ``run_dir/compile_cache``: a requeued job (same run directory)
    loads the kernels its first attempt compiled and autotuned instead of paying for them again.
    Inductor reads the variable whenever it opens its cache, so setting it before the first
    compile is enough."""
    if _USER_INDUCTOR_CACHE:
        return Path(_USER_INDUCTOR_CACHE)
    path = (Path(run_dir) / COMPILE_CACHE).resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class Preempted(RuntimeError):
    """Training stopped on request (SLURM preemption / time limit) after a checkpoint was written."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


class RankFailed(RuntimeError):
    """Another rank failed; raised on every rank but that one, with its cause on one line."""


def environment(device: torch.device, world_size: int) -> dict[str, Any]:
    import torchvision

    env = {"imgclf": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "host": socket.gethostname(), "device": str(device),
           "device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "world_size": world_size, "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "launcher": _launcher()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _launcher() -> str:
    """How this process was started, read from what each launcher sets."""
    from imgclf.launch.base import started_by

    return started_by(os.environ)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``train.dist.use_sync_bn``: every BatchNorm normalises with the statistics of the global
    batch (SyncBatchNorm). torch's DDP refuses SyncBatchNorm on CPU ranks, deep inside its
    constructor; say so here, in terms of the switch."""
    if device.type == "cpu":
        raise ValueError("train.dist.use_sync_bn: SyncBatchNorm needs GPU ranks (torch's DDP refuses it on CPU); "
                         "set it False to train on CPU ranks")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def short_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for prefix in ("NVIDIA ", "GeForce ", "Tesla "):
            name = name.replace(prefix, "")
        return name.split(" ")[0] if "H100" in name or "H200" in name or "A100" in name else name
    return "CPU"


class Trainer:
    def __init__(self, run_dir: str | Path, *, progress: bool | None = None,
                 stop_event: threading.Event | None = None, saved_event: threading.Event | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg = load_run_config(self.run_dir)
        self.stop_event = stop_event or threading.Event()
        self.saved_event = saved_event or threading.Event()
        self.dist_env, self.device = distenv.current(cfg.device)
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        distenv.per_rank_batch(cfg.train.batch_size, self.world_size, cfg.train.subdivision)
        _init_distributed(cfg, self.dist_env, self.device)
        # The ranks' agreements (stop, failure) travel on the host: a gloo group of CPU tensors,
        # whatever the training backend, so reading them never waits for the device.
        self._control = dist.new_group(backend="gloo") if self.world_size > 1 else None
        self._stop_vote: tuple[Any, torch.Tensor] | None = None  # (work, flag) of the last check
        if cfg.train.dist.world_size > 0 and cfg.train.dist.world_size != self.world_size:
            # The world size is part of the run's identity (BN statistics are per rank).
            raise ValueError(f"train.dist.world_size is {cfg.train.dist.world_size} but {self.world_size} "
                             "process(es) were launched; use launcher local/slurm with that many tasks or GPUs")
        self.is_main = self.rank == 0
        if self.device.type == "cpu":  # the resolved config's thread count, whatever the job's CPUs
            torch.set_num_threads(cfg.train.threads)
        self.precision = Precision(C.precision(cfg), self.device)
        self.backend_flags = backend_flags(self.precision.name, self.device.type, cfg.train.deterministic)
        apply_backend_flags(self.backend_flags)
        self.progress = self.is_main if progress is None else (progress and self.is_main)

        data = load_data(cfg.dataset.name, root=cfg.data_root, folder=cfg.dataset.dataset_dir or None)
        self.data = data
        self.n_classes = cfg.dataset.n_classes or data.n_classes
        torch.manual_seed(cfg.train.seed)  # model initialization
        model = build_model(cfg, in_channels=data.n_channels, n_classes=self.n_classes)
        self.n_params = sum(p.numel() for p in model.parameters())
        if self.world_size > 1 and cfg.train.dist.use_sync_bn:
            model = sync_batchnorm(model, self.device)
        self.channels_last = use_channels_last(cfg.train.channels_last, self.device, model)
        model = self.precision.cast_model(model.to(self.device))
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        model = per_view_model(model, cfg.augmentation.use_dual_cutout)  # dual-cutout: a forward per view
        self.ddp_model: nn.Module = model
        if self.world_size > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_model = self.ddp_model
        if cfg.train.compile:
            use_run_compile_cache(self.run_dir)
            try:
                self.step_model = torch.compile(self.ddp_model)
            except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
                log.warning("train.compile: torch.compile unavailable (%s); running eagerly", e)

        from imgclf.optim import build_optimizer, build_scheduler

        # Every rank draws the augmentation of the whole global batch from the same generator and
        # keeps its own shard, so N ranks compute exactly what one process would at that batch.
        train_images, train_labels = data.train_images, data.train_labels
        held_out = None  # the validation split (train.use_test_as_val False), else the test set validates
        if not cfg.train.use_test_as_val:
            train_idx, val_idx = validation_split(len(train_labels), cfg.train.val_ratio, cfg.train.seed)
            held_out = train_images[val_idx].to(self.device), train_labels[val_idx].to(self.device)
            train_images, train_labels = train_images[train_idx], train_labels[train_idx]
        self.loader = DeviceLoader(train_images, train_labels, cfg.train.batch_size, shuffle=True,
                                   drop_last=cfg.train.dataloader.drop_last, seed=cfg.train.seed,
                                   device=self.device, reshuffle=cfg.train.dist.reshuffle_every_epoch)
        if len(self.loader) == 0:
            raise ValueError(f"train.batch_size {cfg.train.batch_size} is larger than the "
                             f"{len(train_labels)} training images")
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.loader))
        self.scaler = self.precision.make_scaler()
        guard_fused_first_step(self.optimizer)
        self.train_transform = TrainTransform(cfg.augmentation, *data.normalization, self.n_classes,
                                              data.image_size, self.device)
        self.eval_transform = EvalTransform(*data.normalization, self.device)
        self.test_images = data.test_images.to(self.device)
        self.test_labels = data.test_labels.to(self.device)
        self.val_images, self.val_labels = held_out or (self.test_images, self.test_labels)

        if self.step_model is not self.ddp_model:
            self._compile_now(data)

        # Progress state (restored from a checkpoint on resume).
        self.epoch = 0  # the epoch being (or next to be) trained, 0-based
        self.step_in_epoch = 0
        self.accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        self.log_rows: list[dict[str, Any]] = []
        self.wall_seconds = 0.0
        self.rollbacks = 0
        self.checkpoints = ckpt.BackgroundWriter(self.run_dir)

    def _compile_now(self, data) -> None:
        """torch.compile compiles lazily, at the first call: a missing compiler or an unsupported
        model would surface in the first training step. Run one forward/backward of a zero batch
        of the training shape now (so the compiled graphs are the ones training reuses), fall back
        to eager on any failure, and restore every parameter, buffer and gradient it touched."""
        batch = self.cfg.train.batch_size // self.world_size // self.cfg.train.subdivision
        x = torch.zeros((batch, data.n_channels, data.image_size, data.image_size), device=self.device,
                        dtype=self.precision.input_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            with self.precision.autocast():
                out = self.step_model(x)
            out.float().sum().backward()
        except Exception as e:  # noqa: BLE001 - compile is an optional speed-up
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("train.compile: torch.compile failed on this model/device (%s: %s); running eagerly",
                        type(e).__name__, first[:200])
            self.step_model = self.ddp_model
        finally:
            self.model.load_state_dict(saved)
            self.optimizer.zero_grad(set_to_none=True)

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
                self.checkpoints.submit(self.state_dict(), after=lambda: self._write_log(rows))
                if wait:
                    self.checkpoints.wait()

        self._on_every_rank(write, "writing the checkpoint")

    def _read_checkpoint(self) -> dict[str, Any] | None:
        def read():
            self.checkpoints.wait()
            return ckpt.load_latest(self.run_dir, map_location=self.device)

        return self._on_every_rank(read, "reading the checkpoint")

    def resume(self) -> bool:
        state = self._read_checkpoint()
        if state is None:
            return False
        self.load_state_dict(state)
        if self.is_main:
            self._write_log()  # drop rows written after this checkpoint: the log never duplicates
        return True

    def _on_every_rank(self, action, what: str):
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
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self._control)
            if failed.item():
                causes: list[str | None] = [None] * self.world_size
                cause = f"{type(error).__name__}: {error}".replace("\n", " ") if error is not None else None
                dist.all_gather_object(causes, cause, group=self._control)
                if error is None:
                    rank, cause = next((r, c) for r, c in enumerate(causes) if c is not None)
                    raise RankFailed(f"{self.run_dir}: rank {rank} failed {what}: {cause}")
        if error is not None:
            raise error
        return result

    def _write_log(self, rows: list[dict[str, Any]] | None = None) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.log_rows if rows is None else rows)
        atomic_write_text(self.run_dir / "train_log.csv", buf.getvalue())

    # ------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits used for accuracy) for one (sub-)batch."""
        from imgclf import losses

        logits = logits.float()
        if self.cfg.augmentation.use_dual_cutout:
            loss = losses.dual_cutout_loss(logits, targets, self.cfg.augmentation.cutout.dual_cutout_alpha)
            return loss, losses.dual_cutout_predict(logits)
        return losses.soft_cross_entropy(logits, targets), logits

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
        loss_total, correct = self._step_body(images, targets, labels)
        faults.point("step")
        self.scheduler.step()
        return loss_total, correct

    def _step_body(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor):
        """Forward, backward and optimizer step. Nothing here reads a value back to the host
        (the loss and the correct count stay on the device): the step never waits for the GPU."""
        cfg = self.cfg
        chunks = cfg.train.subdivision
        dual = cfg.augmentation.use_dual_cutout
        n = len(labels)
        m = n // chunks
        loss_total = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for i in range(chunks):
            sl = slice(i * m, (i + 1) * m)
            if dual:  # images hold [view1; view2]: take the same samples of both views
                x = torch.cat([images[:n][sl], images[n:][sl]])
            else:
                x = images[sl]
            if x.dtype != self.precision.buffer_dtype:  # (an epoch buffer's inputs already are)
                x = x.to(self.precision.input_dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = (self.ddp_model.no_sync() if self.world_size > 1 and i < chunks - 1 else nullcontext())
            with sync:
                with self.precision.autocast():
                    out = self.step_model(x)
                loss, pred_logits = self._loss(out, targets[sl])
                # Ghost BN (train.subdivision): BN sees each chunk alone; the gradient is the batch mean.
                self.scaler.scale(loss / chunks).backward()
            loss_total += loss.detach() / chunks
            correct += (pred_logits.argmax(1) == labels[sl]).sum()
        if cfg.train.gradient_clip > 0:
            # Deviation from the reference (Gradient clipping with train.subdivision > 1): the
            # threshold applies to the batch-mean gradient; the reference clips the sum of the chunks'.
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.gradient_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, correct

    def _shard(self, batch):
        """This rank's part of an augmented global batch (every world_size-th sample)."""
        if self.world_size == 1:
            return batch
        r, w = self.rank, self.world_size
        images = batch.images
        if self.cfg.augmentation.use_dual_cutout:  # [view1; view2]: the same samples of both views
            n = len(batch.labels)
            images = torch.cat([images[:n][r::w], images[n:][r::w]])
        else:
            images = images[r::w]
        return type(batch)(images, batch.targets[r::w], batch.labels[r::w])

    def _check_finite(self, loss_sum: torch.Tensor, step: int) -> None:
        if self.world_size > 1:
            # Every rank checks at the same steps and sees the sum over ranks (non-finite if any
            # rank's is): they raise together, instead of one raising while the others hang in
            # the next all-reduce until the job's time limit.
            loss_sum = loss_sum.detach().clone()
            dist.all_reduce(loss_sum)
        value = float(loss_sum.item())
        if not math.isfinite(value):
            raise Diverged(f"{self.run_dir}: training loss became {value} in epoch {self.epoch + 1}, "
                           f"by step {step + 1} (lr {self._lr():.4g})")

    def _train_epoch(self, bar) -> None:
        cfg = self.cfg
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        t0 = time.perf_counter()
        for step, make_batch in self._epoch_batches():
            if self._stop_requested(step):
                self._flush_accum(loss_sum, correct, seen, t0)
                self.save_checkpoint(wait=True)  # on disk before the launcher is told it is saved
                message = f"{self.run_dir}: stopped at epoch {self.epoch + 1} step {step}; checkpoint saved"
                if self.is_main:
                    log.warning("%s", message)  # in the job's log: where the requeued job resumes
                self.saved_event.set()
                raise Preempted(message)
            # Dropout / shake-shake draw from the global generator: reseeded per (epoch, step).
            torch.manual_seed(derive_seed(cfg.train.seed, self.epoch, step))
            batch = make_batch()
            loss, n_correct = self._train_step(batch.images, batch.targets, batch.labels)
            loss_sum += loss.double() * len(batch.labels)
            correct += n_correct
            seen += len(batch.labels)
            self.step_in_epoch = step + 1
            if bar is not None:
                bar.update(1)
            if (step + 1) % cfg.train.log_period == 0:
                self._check_finite(loss_sum, step)
        self._check_finite(loss_sum, len(self.loader) - 1)
        self._flush_accum(loss_sum, correct, seen, t0)

    def _augment(self, step: int, images: torch.Tensor, labels: torch.Tensor, per_sample=None):
        """This rank's augmented batch of ``step``: every draw from a generator seeded by
        (seed, epoch, step), so it is the same whenever (and in whichever order) it is made.
        ``per_sample``: the images already through the per-sample transforms (batched draws);
        then only the mixer draws from it."""
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.train.seed, self.epoch, step))
        if cfg.train.dist.augment_per_rank and self.world_size > 1 and per_sample is None:
            # as the reference's identically seeded workers: this rank's shard drawn as a whole batch,
            # so every rank draws the same parameters for the same position; the mixer is per rank too
            r, w = self.rank, self.world_size
            x = self.train_transform.per_sample(images[r::w], gen)
            return self.train_transform.per_batch(x, labels[r::w], gen)
        x = self.train_transform.per_sample(images, gen) if per_sample is None else per_sample
        if cfg.train.dist.mixer_per_rank and self.world_size > 1:  # as the reference's per-process collator
            return self.train_transform.per_batch(x, labels, gen, mix_shard=(self.rank, self.world_size))
        return self._shard(self.train_transform.per_batch(x, labels, gen))

    def _epoch_batches(self):
        """(step, a function giving the step's batch) from ``step_in_epoch`` on: augmented at the
        step, or (train.epoch_augmentation) taken from the epoch's resident buffer."""
        cfg = self.cfg
        if cfg.train.epoch_augmentation and cfg.train.epoch_augmentation_draws == "batched":
            yield from self._batched_epoch_batches()
            return
        batches = self.loader.batches(self.epoch, start=self.step_in_epoch)
        if not (cfg.train.epoch_augmentation and self._epoch_buffer_fits()):
            for step, images, labels in batches:
                yield step, lambda s=step, i=images, y=labels: self._augment(s, i, y)
            return
        buffer = []  # the rest of the epoch, made before its first step
        for step, images, labels in batches:
            buffer.append((step, self._to_buffer(self._augment(step, images, labels))))
        for step, b in buffer:
            yield step, lambda b=b: b

    def _to_buffer(self, b):
        x = b.images.to(self.precision.buffer_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return type(b)(x, b.targets, b.labels)

    def _batched_epoch_batches(self):
        """train.epoch_augmentation_draws batched: the per-sample transforms of a chunk of
        ``BATCHED_CHUNK_SAMPLES // batch_size`` steps in one call, from a generator seeded by
        (seed, epoch, the chunk's first step); each step's mixer from its (seed, epoch, step)
        generator. Every rank augments the global batches and keeps its shard, as per step. All
        chunks of the rest of the epoch are made at its start when they fit the budget, else one
        at a time: the same numbers. A resume remakes the chunk it stopped in and skips its done
        steps."""
        cfg = self.cfg
        per_chunk = max(1, BATCHED_CHUNK_SAMPLES // cfg.train.batch_size)
        first = self.step_in_epoch - self.step_in_epoch % per_chunk
        batches = self.loader.batches(self.epoch, start=first)
        chunks = (self._batched_chunk(list(itertools.islice(batches, per_chunk)))
                  for _ in range(first, len(self.loader), per_chunk))
        if self._epoch_buffer_fits():
            chunks = list(chunks)  # resident: the whole rest of the epoch before its first step
        for chunk in chunks:
            for step, b in chunk:
                if step >= self.step_in_epoch:
                    yield step, lambda b=b: b

    def _batched_chunk(self, steps):
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(cfg.train.seed, self.epoch, steps[0][0], 1))  # 4 parts: apart from the step seeds
        x = self.train_transform.per_sample(torch.cat([images for _, images, _ in steps]), gen)
        out, at = [], 0
        for step, images, labels in steps:
            xs, at = x[at:at + len(images)], at + len(images)
            out.append((step, self._to_buffer(self._augment(step, images, labels, per_sample=xs))))
        return out

    def _epoch_buffer_fits(self) -> bool:
        """The buffer holds the epoch's inputs, targets and labels: above
        train.epoch_augmentation_max_gb, augment per step instead (the same numbers, slower)."""
        cfg, data = self.cfg, self.data
        steps = len(self.loader) - self.step_in_epoch
        per_sample = (data.n_channels * data.image_size ** 2 * self.precision.buffer_dtype.itemsize
                      * (2 if cfg.augmentation.use_dual_cutout else 1) + 4 * self.n_classes + 8)
        need = steps * (cfg.train.batch_size // self.world_size) * per_sample
        budget = cfg.train.epoch_augmentation_max_gb * 2 ** 30
        if need <= budget:
            return True
        if not getattr(self, "_warned_buffer", False):
            fallback = ("making one chunk at a time" if cfg.train.epoch_augmentation_draws == "batched"
                        else "augmenting per step")
            log.warning("train.epoch_augmentation: the epoch's buffer needs %.2f GB, more than "
                        "train.epoch_augmentation_max_gb %g; %s", need / 2 ** 30,
                        cfg.train.epoch_augmentation_max_gb, fallback)
            self._warned_buffer = True
        return False

    def _stop_requested(self, step: int) -> bool:
        if self.world_size == 1:
            return self.stop_event.is_set()
        if step % STOP_CHECK_STEPS:
            return False
        stop = False
        if self._stop_vote is not None:  # started STOP_CHECK_STEPS steps ago: long done
            work, flag = self._stop_vote
            work.wait()
            stop = bool(flag.item())  # a CPU tensor: no device sync
            self._stop_vote = None
        if not stop:  # (every rank read the same flag, so every rank starts the next vote or none)
            flag = torch.tensor([float(self.stop_event.is_set())])
            self._stop_vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control, async_op=True),
                               flag)
        return stop

    def _end_stop_vote(self) -> None:
        """Wait for the vote in flight: every rank started it, so it completes at once."""
        if self._stop_vote is not None:
            self._stop_vote[0].wait()
            self._stop_vote = None

    def _flush_accum(self, loss_sum, correct, seen, t0) -> None:
        if self.world_size > 1:
            t = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=self.device,
                                                                               dtype=torch.float64)])
            dist.all_reduce(t)
            loss_sum, correct, seen = t[0], t[1], int(t[2].item())
        self.accum["loss_sum"] += float(loss_sum.item())
        self.accum["correct"] += int(correct.item())
        self.accum["seen"] += seen
        self.accum["seconds"] += time.perf_counter() - t0

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        epochs = cfg.scheduler.epochs
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = {**environment(self.device, self.world_size), "precision": self.precision.name, **self.backend_flags}
        self._on_every_rank(lambda: self.is_main and write_json(self.run_dir / "env.json", env), "writing env.json")
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
                self.log_rows.append({"epoch": 0, "lr": self._lr(), "train_loss": float("nan"),
                                      "train_error": float("nan"), "test_loss": evaluation["test_loss"],
                                      "test_error": evaluation["test_error"], "epoch_seconds": 0.0,
                                      "images_per_second": float("nan")})
            self.save_checkpoint()  # the initial state: what a divergence in epoch 1 rolls back to
        board = self._tensorboard()
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
                a = self.accum
                row = {"epoch": self.epoch + 1, "lr": self._lr(),
                       "train_loss": a["loss_sum"] / max(a["seen"], 1),
                       "train_error": 100.0 * (1 - a["correct"] / max(a["seen"], 1)),
                       "test_loss": evaluation["test_loss"], "test_error": evaluation["test_error"],
                       "epoch_seconds": a["seconds"],
                       "images_per_second": a["seen"] / a["seconds"] if a["seconds"] > 0 else float("nan")}
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
            self._on_every_rank(self.checkpoints.wait, "writing the checkpoint")
        finally:
            if bar is not None:
                bar.close()
            if board is not None:
                board.close()
            self.checkpoints.wait(raise_error=False)  # a crash still leaves the pending checkpoint
        self._end_stop_vote()
        self.wall_seconds = wall_before + time.perf_counter() - started
        return self._finish(evaluation)

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

    def _diverged(self, error: Diverged) -> dict[str, Any]:
        """A diverged run is finished: result.json says so, and the table shows it as diverged."""
        result = {"diverged": True, "message": str(error), "test_error": None, "epochs": self.cfg.scheduler.epochs,
                  "diverged_at_epoch": self.epoch + 1, "rollbacks": self.rollbacks, "seed": self.cfg.train.seed,
                  "config_hash": C.config_hash(self.cfg), "run_id": self.run_dir.parent.name,
                  "wall_seconds": self.wall_seconds, "train_seconds": None, "gpu": short_device_name(self.device),
                  "n_params": self.n_params, "world_size": self.world_size, "precision": self.precision.name}

        def write():
            if self.is_main:
                write_json(self.run_dir / "diverged.json", result)
                write_json(self.run_dir / "result.json", result)

        self._end_stop_vote()
        self._on_every_rank(write, "writing diverged.json")
        log.error("%s", error)
        return result

    def _tensorboard(self) -> "_Board | None":
        """``train.use_tensorboard``: the per-epoch scalars as the reference logs them, as event
        files beside train_log.csv (rank 0). A resumed run drops events after its checkpoint."""
        if not (self.cfg.train.use_tensorboard and self.is_main):
            return None
        board = _Board(self.run_dir, purge_step=self.epoch + 1 if self.epoch else None)
        if self.epoch == 0 and self.log_rows and self.log_rows[0]["epoch"] == 0:
            board.epoch(self.log_rows[0])  # train.val_first's row
        return board

    def _evaluate(self, test: bool = False) -> dict[str, Any]:
        """The validation set's loss and error (the test set unless train.use_test_as_val is
        False); ``test``: the test set's."""
        faults.point("eval")
        images, labels = (self.test_images, self.test_labels) if test else (self.val_images, self.val_labels)
        return evaluate(self.model, images, labels, self.eval_transform,
                        batch_size=self.cfg.validation.batch_size, precision=self.precision, rank=self.rank,
                        world_size=self.world_size, channels_last=self.channels_last)

    def _finish(self, evaluation: dict[str, Any]) -> dict[str, Any]:
        last = self.log_rows[-1]
        result = {
            "test_error": last["test_error"], "test_loss": last["test_loss"], "train_error": last["train_error"],
            "train_loss": last["train_loss"], "epochs": self.cfg.scheduler.epochs,
            "wall_seconds": self.wall_seconds,
            "train_seconds": sum(r["epoch_seconds"] for r in self.log_rows),
            "device": str(self.device), "gpu": short_device_name(self.device), "world_size": self.world_size,
            "precision": self.precision.name, "n_params": self.n_params, "seed": self.cfg.train.seed,
            "config_hash": C.config_hash(self.cfg), "run_id": self.run_dir.parent.name,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if not self.cfg.train.use_test_as_val:  # the log scored the held-out split; the result is the test set's
            test = self._evaluate(test=True)
            result.update(val_error=last["test_error"], val_loss=last["test_loss"], test_error=test["test_error"],
                          test_loss=test["test_loss"])

        def write():
            if self.is_main:
                from imgclf.utils import atomic_write_bytes

                buf = io.BytesIO()
                torch.save(self.model.state_dict(), buf)
                atomic_write_bytes(self.run_dir / "model.pt", buf.getvalue())
                write_json(self.run_dir / "result.json", result)  # last: its existence means "complete"

        self._on_every_rank(write, "writing the model and result.json")
        return result


def validation_split(n: int, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of ``n`` training images, as the reference's random_split
    draws them: ``int(n * ratio)`` held out, a permutation from ``seed`` alone (so every rank and
    every resume holds out the same images)."""
    n_val = int(n * ratio)
    if not 0 < n_val < n:
        raise ValueError(f"train.val_ratio: {ratio:g} of {n} training images holds out {n_val}; "
                         "choose a ratio that holds out at least one image and keeps one")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n - n_val], perm[n - n_val:]


class _Board:
    """TensorBoard event files of the reference's per-epoch scalars (accuracies as fractions)."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("train.use_tensorboard: needs the tensorboard package (pip install tensorboard), "
                             "which is not installed; install it or set train.use_tensorboard False") from None
        self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)

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


def _init_distributed(cfg: C.Config, d: distenv.DistEnv, device: torch.device) -> None:
    """env:// process group of ``d`` (the launcher exported MASTER_ADDR/PORT)."""
    if not d.distributed or dist.is_initialized():
        return
    backend = distenv.backend(cfg.train.dist.backend, device.type)
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method=cfg.train.dist.init_method, rank=d.rank,
                            world_size=d.world_size)


def train(run_dir: str | Path, *, resume: bool = True, progress: bool | None = None,
          stop_event: threading.Event | None = None) -> dict[str, Any]:
    """Train the run in ``run_dir`` (which holds config.yaml) to completion; returns result.json's dict.

    The process group goes on every way out, a failure to build the trainer or to resume included:
    a rank that ends tears down its connections, so the other ranks' collectives fail at once
    instead of waiting for the group's timeout."""
    try:
        trainer = Trainer(run_dir, progress=progress, stop_event=stop_event)
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
