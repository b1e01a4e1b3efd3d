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
  The reference multiplies this by ``base_lr`` once more (its warmup piece is
  built with ``base_lr`` inside a ``LambdaLR`` that applies it again), so its lr
  during the warmup is ``base_lr**2 * (...)`` and jumps to ``base_lr`` at ``W``; a
  bug, not reproduced. No table row uses an exponential warmup.

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
    cycle_steps: tuple[int, ...]  # sgdr: the length of each cosine cycle

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
        cycles: list[int] = []
        if sched.type == "sgdr":
            cycles = [sched.T0]
            while sum(cycles) < sched.epochs - warmup_epochs:
                cycles.append(max(int(cycles[-1] * sched.T_mul), 1))
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
        )

    def factor(self, step: int) -> float:
        return float(self.factors(torch.tensor([step]))[0])

    def factors(self, steps: torch.Tensor) -> torch.Tensor:
        """The factor at every step of ``steps`` (any integer tensor), as float64; one
        vectorised evaluation serves the scheduler's single step and a whole run's curve."""
        s = torch.as_tensor(steps).to(torch.float64)
        if s.numel() and bool((s < 0).any()):
            raise ValueError(f"step must be >= 0, got {int(s.min())}")
        out = self._main((s - self.warmup_steps).clamp(0, self.main_steps))
        if self.warmup_steps:
            t = s / self.warmup_steps
            ramp = t if self.warmup_type == "linear" else t ** self.exponent
            out = torch.where(s < self.warmup_steps, self.start_factor + (1.0 - self.start_factor) * ramp, out)
        return out

    def _main(self, tau: torch.Tensor) -> torch.Tensor:
        """tau: steps since the warmup ended, already clamped to [0, main_steps]."""
        if self.type == "constant":
            return torch.ones_like(tau)
        if self.type == "multistep":
            # milestones strictly before tau: the milestone's own step keeps the old lr
            passed = torch.searchsorted(torch.tensor(self.milestone_steps, dtype=tau.dtype), tau, right=False)
            return self.lr_decay ** passed.to(tau.dtype)
        if self.type == "linear":
            return 1.0 + (self.lr_min_factor - 1.0) * tau / self.main_steps
        if self.type == "cosine":
            return self._cosine(tau / self.main_steps)
        # sgdr: the first cycle whose end is >= tau; at a cycle's last step (tau == its end)
        # the next cycle has not begun
        lengths = torch.tensor(self.cycle_steps, dtype=tau.dtype)
        ends = lengths.cumsum(0)
        k = torch.searchsorted(ends, tau, right=False).clamp_max(len(lengths) - 1)
        return self._cosine((tau - (ends[k] - lengths[k])) / lengths[k])

    def _cosine(self, progress: torch.Tensor) -> torch.Tensor:
        m = self.lr_min_factor
        return m + (1.0 - m) * 0.5 * (1.0 + torch.cos(math.pi * progress))


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
        # the whole run's curve, evaluated once: a per-step tensor evaluation would cost ~0.1 ms
        self._curve = plan.factors(torch.arange(plan.warmup_steps + plan.main_steps + 1)).tolist()
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self._curve[min(self.last_epoch, len(self._curve) - 1)]
        return [base * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "plan", "_curve")}
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
