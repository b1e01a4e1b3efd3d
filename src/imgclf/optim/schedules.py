"""Learning-rate schedules, evaluated per iteration.

The learning rate at optimizer step ``s`` (0-based; the engine calls
``scheduler.step()`` after every optimizer step) is ``base_lr * lr_factor(cfg, s, steps_per_epoch)``.
Working per iteration rather than per epoch keeps warmup smooth at large
batches, where an epoch is only a dozen steps (CIFAR at batch 4096).

Timeline convention: the warmup is PREPENDED. It takes the first
``warmup.epochs`` epochs; the main schedule's clock starts at zero where the
warmup ends and runs to ``scheduler.epochs``, so the main schedule lasts
``scheduler.epochs - warmup.epochs`` epochs. Every main-schedule time is
counted on that clock: ``milestones`` and SGDR's ``T0`` are epochs after the
warmup ends (with 5 warmup epochs, milestones [80, 120] decay at epochs 85 and
125), and linear and cosine reach their end value at ``scheduler.epochs``.
Without warmup the two clocks coincide.

Warmup (Goyal et al., arXiv:1706.02677, sec. 2.2), ``t`` = step, ``W`` = warmup steps:

* linear:       ``start_factor + (1 - start_factor) * t / W``, reaching 1 at ``W``
* exponential:  ``1 - exp(-exponent * t / W)`` (the reference offers this shape; its README
  gives no formula, so this follows the brief); it starts
  at 0 and is a factor on the base lr like every other term here (the base lr is
  applied once, by the scheduler). It ends at ``1 - exp(-exponent)`` (0.98 for
  the default 4) and steps to the main schedule's 1 at ``W``.

Main schedules, ``tau`` = steps since the warmup ended, ``L`` = main-schedule steps:

* constant:  1
* multistep: ``lr_decay ** (number of milestones reached)``, a milestone is reached at its first step
* linear:    ``1 - tau / L``, 0 at the end
* cosine:    ``m + (1 - m) * (1 + cos(pi * tau / L)) / 2``, ``m = lr_min_factor``: base_lr*m at the end
  (the no-restart case of SGDR, Loshchilov & Hutter, arXiv:1608.03983)
* sgdr:      the same cosine restarted at ``T0``, ``T0 + T0*T_mul``, ``T0 + T0*T_mul + T0*T_mul**2``, ...
  epochs (arXiv:1608.03983, eq. 5; ``lr_min_factor`` is its eta_min), each cycle
  starting again from the base lr.

At and past the end (step ``scheduler.epochs * steps_per_epoch``, the value a
finished scheduler holds) every curve holds its end value: 0 for linear,
``lr_min_factor`` for cosine and for an SGDR cycle that ends with the run.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from imgclf.config import Config, SchedulerConfig


@dataclass(frozen=True)
class SchedulePlan:
    """A schedule resolved to steps; plain values only, so it serialises anywhere."""

    warmup_type: str
    warmup_steps: int
    start_factor: float
    exponent: float
    type: str
    main_steps: int
    milestone_steps: tuple[int, ...]
    lr_decay: float
    lr_min_factor: float
    T0_steps: int
    T_mul: float

    @classmethod
    def from_config(cls, sched: SchedulerConfig, steps_per_epoch: int) -> SchedulePlan:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        w = sched.warmup
        if w.type not in ("none", "linear", "exponential"):
            raise ValueError(f"scheduler.warmup.type: unknown warmup '{w.type}' (none | linear | exponential)")
        if sched.type not in ("constant", "multistep", "linear", "cosine", "sgdr"):
            raise ValueError(
                f"scheduler.type: unknown schedule '{sched.type}' (constant | multistep | linear | cosine | sgdr)"
            )
        warmup_epochs = w.epochs if w.type != "none" else 0
        if not 0 <= warmup_epochs < sched.epochs:
            raise ValueError(
                f"scheduler.warmup.epochs: {warmup_epochs} must be in [0, scheduler.epochs={sched.epochs})"
            )
        if w.type == "exponential" and w.exponent <= 0:
            raise ValueError(f"scheduler.warmup.exponent: must be > 0, got {w.exponent}")
        if w.type == "linear" and not 0 <= w.start_factor <= 1:
            raise ValueError(f"scheduler.warmup.start_factor: must be in [0, 1], got {w.start_factor}")
        if sched.type in ("cosine", "sgdr") and not 0 <= sched.lr_min_factor <= 1:
            raise ValueError(f"scheduler.lr_min_factor: must be in [0, 1], got {sched.lr_min_factor}")
        if sched.type == "sgdr":
            if sched.T0 <= 0:
                raise ValueError(f"scheduler.T0: must be > 0 epochs, got {sched.T0}")
            if sched.T_mul < 1:
                # shrinking cycles would converge to a point before the run ends
                raise ValueError(f"scheduler.T_mul: must be >= 1, got {sched.T_mul}")
        if sched.type == "multistep" and list(sched.milestones) != sorted(sched.milestones):
            raise ValueError(f"scheduler.milestones: must be increasing, got {sched.milestones}")
        return cls(
            warmup_type=w.type if warmup_epochs > 0 else "none",
            warmup_steps=warmup_epochs * steps_per_epoch,
            start_factor=float(w.start_factor),
            exponent=float(w.exponent),
            type=sched.type,
            main_steps=(sched.epochs - warmup_epochs) * steps_per_epoch,
            milestone_steps=tuple(m * steps_per_epoch for m in sched.milestones),
            lr_decay=float(sched.lr_decay),
            lr_min_factor=float(sched.lr_min_factor),
            T0_steps=sched.T0 * steps_per_epoch,
            T_mul=float(sched.T_mul),
        )

    def factor(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            t = step / self.warmup_steps
            if self.warmup_type == "linear":
                return self.start_factor + (1.0 - self.start_factor) * t
            return 1.0 - math.exp(-self.exponent * t)
        return self._main(step - self.warmup_steps)

    def _main(self, tau: int) -> float:
        if self.type == "constant":
            return 1.0
        if self.type == "multistep":
            return self.lr_decay ** sum(tau >= m for m in self.milestone_steps)
        if self.type == "linear":
            return max(0.0, 1.0 - tau / self.main_steps)
        if self.type == "cosine":
            return self._cosine(min(tau, self.main_steps) / self.main_steps)
        # sgdr: walk the cycles; their number grows with log(run length), so this is cheap.
        # A restart that falls exactly at the end of the run is not taken: the run
        # ends its last cycle at eta_min, as cosine does.
        tau = min(tau, self.main_steps)
        start, length = 0.0, float(self.T0_steps)
        while tau > start + length or tau == start + length < self.main_steps:
            start += length
            length *= self.T_mul
        return self._cosine((tau - start) / length)

    def _cosine(self, progress: float) -> float:
        m = self.lr_min_factor
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The multiplier on ``train.base_lr`` at optimizer step ``step`` (0-based)."""
    return SchedulePlan.from_config(cfg.scheduler, steps_per_epoch).factor(step)


def _plain(plan: SchedulePlan | dict[str, Any]) -> dict[str, Any]:
    d = dataclasses.asdict(plan) if isinstance(plan, SchedulePlan) else dict(plan)
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}


class PerIterationLR(LRScheduler):
    """``base_lr * plan.factor(step)`` for every param group, stepped once per iteration.

    Its state is the step counter and the base lrs (plain values, loadable with
    ``torch.load(weights_only=True)``). ``load_state_dict`` also writes the
    resumed step's lr into the optimizer, so a resumed run continues exactly
    whichever of optimizer and scheduler is loaded first.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: SchedulePlan, last_epoch: int = -1) -> None:
        self.plan = plan
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.plan.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "plan")}
        state["plan"] = _plain(self.plan)  # for the record; the config decides
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved_plan = state.pop("plan", None)
        if saved_plan is not None and _plain(saved_plan) != _plain(self.plan):
            warnings.warn(
                "resuming with a learning-rate schedule that differs from the checkpoint's; "
                "the current config's schedule is used from the saved step on",
                stacklevel=2,
            )
        self.__dict__.update(state)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> PerIterationLR:
    """The scheduler for ``cfg.scheduler``; call ``step()`` after every optimizer step."""
    return PerIterationLR(optimizer, SchedulePlan.from_config(cfg.scheduler, steps_per_epoch))
