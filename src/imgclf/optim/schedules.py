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

Each piece below is the reference implementation's (its ``scheduler/`` package), so
every table row's learning rate equals the reference's at every step
(``tests/fidelity/test_schedules.py``). Like the reference, a boundary between two
pieces (warmup end, a milestone, an SGDR restart) takes effect on the step AFTER
it: the step at a boundary still belongs to the piece that ends there (the
reference finds the piece with ``bisect_left`` on the boundaries). So a multistep
milestone at epoch m first lowers the lr at step ``m * steps_per_epoch + 1``.

Warmup (Goyal et al., arXiv:1706.02677, sec. 2.2), ``t`` = step, ``W`` = warmup steps:

* linear:       ``start_factor + (1 - start_factor) * t / W``, reaching 1 at ``W``
* exponential:  ``start_factor + (1 - start_factor) * (t / W) ** exponent``, reaching 1 at ``W``.
  Deviation from the reference (Exponential warmup): the reference multiplies this
  by ``base_lr`` once more (its warmup piece is built with ``base_lr`` inside a
  ``LambdaLR`` that applies it again), so its lr during the warmup is
  ``base_lr**2 * (...)`` and jumps to ``base_lr`` at ``W``; a bug, not reproduced.
  No table row uses an exponential warmup.

Main schedules, ``tau`` = steps since the warmup ended, ``L`` = main-schedule steps,
``m`` = ``lr_min_factor``:

* constant:  1
* multistep: ``lr_decay ** (number of milestones passed)``, a milestone passed once ``tau > milestone``
* linear:    ``1 + (m - 1) * tau / L``: from 1 to ``m`` at the end
* cosine:    ``m + (1 - m) * (1 + cos(pi * tau / L)) / 2``: base_lr*m at the end
  (the no-restart case of SGDR, Loshchilov & Hutter, arXiv:1608.03983)
* sgdr:      the same cosine restarted after cycles of ``T0``, ``int(T0 * T_mul)``,
  ``int(int(T0 * T_mul) * T_mul)``, ... epochs (arXiv:1608.03983, eq. 5; ``lr_min_factor``
  is its eta_min; cycle lengths rounded down to whole epochs as the reference does),
  each cycle starting again from the base lr. A last cycle that would run past
  the end is cut there (the reference refuses such a T0/T_mul).

At and past the end (step ``scheduler.epochs * steps_per_epoch``, the value a
finished scheduler holds) every curve holds its end value: ``lr_min_factor`` for
linear, cosine and an SGDR cycle that ends with the run.

``scheduler.step_before_update`` reproduces the reference's train.py of 2019, which
trained the batch-size, LARS and no-weight-decay-on-BN tables: it stepped its scheduler
before each optimizer step, so optimizer step ``s`` ran at the lr of step ``s + 1`` of
the curve above. Its multistep (``MultiStepLR.step(epoch)``, milestones counted with
``bisect_right``) thus lowers the lr from the first step of a milestone's epoch, one
step earlier than the later code, and its cosine (a ``LambdaLR`` stepped before the
update, floor ``--lr_min`` 0, which those rows set as ``lr_min_factor`` 0) reaches its
floor on the last step.

Cost: the factor at a step is a closed form in plain Python floats, evaluated when the
step is taken: constant time and memory whatever the run's length (SGDR looks its
cycle up among the cycles whose length still grows, O(log) of their number; once
``int(T * T_mul)`` stops growing every later cycle has one length, found by a division).
A run has at most ``config.MAX_TOTAL_STEPS`` optimizer steps, checked at config
resolution and again here with the real steps per epoch.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from imgclf.config import MAX_TOTAL_STEPS, Config, SchedulerConfig


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
    # sgdr: the lengths of the cosine cycles while they grow; every later cycle has the last length
    cycle_steps: tuple[int, ...]
    step_before_update: bool = False  # step s at the curve's step s + 1 (the 2019 train.py)

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
        if sched.type in ("linear", "cosine", "sgdr") and not 0 <= sched.lr_min_factor <= 1:
            raise ValueError(f"scheduler.lr_min_factor: must be in [0, 1], got {sched.lr_min_factor}")
        if sched.type == "sgdr":
            if sched.T0 <= 0:
                raise ValueError(f"scheduler.T0: must be > 0 epochs, got {sched.T0}")
            if sched.T_mul < 1:
                # shrinking cycles would converge to a point before the run ends
                raise ValueError(f"scheduler.T_mul: must be >= 1, got {sched.T_mul}")
        if sched.type == "multistep" and list(sched.milestones) != sorted(sched.milestones):
            raise ValueError(f"scheduler.milestones: must be increasing, got {sched.milestones}")
        if sched.epochs * steps_per_epoch > MAX_TOTAL_STEPS:
            raise ValueError(f"scheduler.epochs {sched.epochs} x {steps_per_epoch} steps per epoch (the training "
                             f"set / train.batch_size) = {sched.epochs * steps_per_epoch:,} optimizer steps, more "
                             f"than the limit of {MAX_TOTAL_STEPS:,}")
        cycles: list[int] = []
        if sched.type == "sgdr":
            # int(T * T_mul) >= T: the lengths grow until one repeats, then stay; only the growing
            # ones are listed (at most a few dozen unless T_mul is barely above 1)
            cycles, total = [sched.T0], sched.T0
            while total < sched.epochs - warmup_epochs:
                grown = cycles[-1] * sched.T_mul
                if math.isinf(grown):
                    raise ValueError(f"scheduler.T_mul: {sched.T_mul} makes an SGDR cycle infinitely long")
                nxt = max(int(grown), 1)
                if nxt == cycles[-1]:
                    break
                cycles.append(nxt)
                total += nxt
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
            cycle_steps=tuple(c * steps_per_epoch for c in cycles),
            step_before_update=bool(sched.step_before_update),
        )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cycle_ends", tuple(itertools.accumulate(self.cycle_steps)))

    def factor(self, step: int) -> float:
        """The factor at optimizer step ``step`` (an int >= 0), in constant time and memory."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        s = step + 1 if self.step_before_update else step
        if s < self.warmup_steps:
            t = s / self.warmup_steps
            ramp = t if self.warmup_type == "linear" else t ** self.exponent
            return self.start_factor + (1.0 - self.start_factor) * ramp
        return self._main(min(s - self.warmup_steps, self.main_steps))

    def factors(self, steps: torch.Tensor) -> torch.Tensor:
        """:meth:`factor` at every step of ``steps`` (any integer tensor), as float64: the same
        numbers, for tests and plots of a whole curve."""
        flat = torch.as_tensor(steps).reshape(-1).tolist()
        return torch.tensor([self.factor(int(s)) for s in flat], dtype=torch.float64).reshape(
            torch.as_tensor(steps).shape)

    def _main(self, tau: int) -> float:
        """tau: steps since the warmup ended, already clamped to [0, main_steps]."""
        if self.type == "constant":
            return 1.0
        if self.type == "multistep":
            # milestones strictly before tau: the milestone's own step keeps the old lr
            return self.lr_decay ** float(bisect.bisect_left(self.milestone_steps, tau))
        if self.type == "linear":
            return 1.0 + (self.lr_min_factor - 1.0) * tau / self.main_steps
        if self.type == "cosine":
            return self._cosine(tau / self.main_steps)
        # sgdr: the first cycle whose end is >= tau; at a cycle's last step (tau == its end)
        # the next cycle has not begun
        ends = self._cycle_ends
        if tau <= ends[-1]:
            k = bisect.bisect_left(ends, tau)
            start, length = ends[k] - self.cycle_steps[k], self.cycle_steps[k]
        else:  # past the growing cycles: all of the last length
            length = self.cycle_steps[-1]
            start = ends[-1] + (tau - ends[-1] - 1) // length * length
        return self._cosine((tau - start) / length)

    def _cosine(self, progress: float) -> float:
        m = self.lr_min_factor
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The multiplier on ``train.base_lr`` at optimizer step ``step`` (0-based)."""
    return SchedulePlan.from_config(cfg.scheduler, steps_per_epoch).factor(step)


def _plain(plan: SchedulePlan | dict[str, Any]) -> dict[str, Any]:
    d = dataclasses.asdict(plan) if isinstance(plan, SchedulePlan) else dict(plan)
    if not d.get("step_before_update"):  # a checkpoint from before the option holds no such key
        d.pop("step_before_update", None)
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
        f = self.plan.factor(self.last_epoch)  # a closed form per step: no curve is kept
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
