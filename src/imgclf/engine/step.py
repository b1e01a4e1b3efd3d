"""One training step on one batch: forward, loss, backward and optimizer update (in
train.subdivision chunks, under the run's precision and loss scaler), then the scheduler. The
trainer calls it for every step and the benchmarks time it, so both run the same code.

Nothing in :meth:`Step.body` reads a value back to the host (the loss and the correct count
stay on the device): the step never waits for the GPU.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn

from imgclf import config as C, losses
from imgclf.augment.pipeline import Batch

from . import faults
from .precision import Precision


class Step:
    """The step of a model, its optimizer and its scheduler, built once per run."""

    def __init__(self, model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 precision: Precision, *, scaler: torch.amp.GradScaler | None = None, subdivision: int = 1,
                 gradient_clip: float = 0.0, channels_last: bool = False, dual_cutout_alpha: float = 0.0,
                 ddp: nn.parallel.DistributedDataParallel | None = None):
        self.model = model  # the weights: gradient clipping reads their gradients
        self.forward = forward  # what a step calls: the model per view, under DDP, compiled
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.scaler = scaler if scaler is not None else precision.make_scaler()
        self.subdivision, self.gradient_clip, self.channels_last = subdivision, gradient_clip, channels_last
        self.dual_cutout_alpha = dual_cutout_alpha
        self.ddp = ddp  # several ranks: the chunks but the last accumulate without an all-reduce

    @classmethod
    def of(cls, cfg: C.Config, model: nn.Module, forward: nn.Module, optimizer, scheduler, precision: Precision,
           **kwargs) -> "Step":
        """The step ``cfg`` asks for (train.subdivision, train.gradient_clip, dual-cutout's alpha)."""
        return cls(model, forward, optimizer, scheduler, precision, subdivision=cfg.train.subdivision,
                   gradient_clip=cfg.train.gradient_clip,
                   dual_cutout_alpha=cfg.augmentation.cutout.dual_cutout_alpha, **kwargs)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, correct count) of the batch, both on the device."""
        loss_total, correct = self.body(batch)
        faults.point("step")
        self.scheduler.step()
        return loss_total, correct

    def body(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and optimizer step, without the scheduler."""
        chunks, device = self.subdivision, self.precision.device
        m = len(batch) // chunks
        loss_total = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(chunks):
            sl = slice(i * m, (i + 1) * m)
            x = batch.view_images(sl)  # the same samples of every view
            if x.dtype != self.precision.buffer_dtype:  # (an epoch buffer's inputs already are)
                x = x.to(self.precision.input_dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = self.ddp.no_sync() if self.ddp is not None and i < chunks - 1 else nullcontext()
            with sync:
                with self.precision.autocast():
                    out = self.forward(x)
                loss, pred_logits = self.loss(out, batch.targets[sl], batch.views)
                # Ghost BN (train.subdivision): BN sees each chunk alone; the gradient is the batch mean.
                self.scaler.scale(loss / chunks).backward()
            loss_total += loss.detach() / chunks
            correct += (pred_logits.argmax(1) == batch.labels[sl]).sum()
        if self.gradient_clip > 0:
            # Deviation from the reference (Gradient clipping with train.subdivision > 1): the
            # threshold applies to the batch-mean gradient; the reference clips the sum of the chunks'.
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.gradient_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, correct

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, views: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits used for accuracy) of one (sub-)batch of ``views`` views per sample."""
        logits = logits.float()
        if views == 2:  # dual-cutout: the views' mean loss plus their consistency
            return losses.dual_cutout_loss(logits, targets, self.dual_cutout_alpha), losses.dual_cutout_predict(logits)
        if views != 1:
            raise ValueError(f"a training batch of {views} views per sample: the losses know 1 and 2 (dual-cutout)")
        return losses.soft_cross_entropy(logits, targets), logits
