"""Schedule work is bounded: the learning rate at a step is a closed form (no whole-run curve is
kept), SGDR finds its cycle without listing every cycle, and a run has at most
``config.MAX_TOTAL_STEPS`` optimizer steps, refused at config resolution with the keys named."""
from __future__ import annotations

import math
import signal
import tracemalloc
from contextlib import contextmanager

import pytest
import torch

from imgclf import config as C
from imgclf.optim.schedules import PerIterationLR, SchedulePlan

CIFAR = "config/recipes/cifar/resnet_preact.yaml"


@contextmanager
def within(seconds: int):
    """A hang fails the test instead of the suite (generous: the work is milliseconds)."""
    def fail(*_):
        raise TimeoutError(f"not done within {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sched(**kw) -> C.SchedulerConfig:
    s = C.SchedulerConfig()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_1e8_epochs_are_refused_at_config_resolution_naming_the_keys():
    with pytest.raises(C.ConfigError) as e:
        C.build(CIFAR, {"scheduler.epochs": 10**8})
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("scheduler.epochs", "train.batch_size 128", "CIFAR10's 50,000 training images",
                 "390 steps per epoch", "39,000,000,000 optimizer steps", "limit of 1,000,000,000"):
        assert part in msg, (part, msg)


def test_the_step_limit_is_exact():
    # one step per epoch (batch = the training set): the epoch count is the step count
    ok = C.build(CIFAR, {"train.batch_size": 50000, "scheduler.epochs": C.MAX_TOTAL_STEPS})
    assert ok.scheduler.epochs == 10**9
    with pytest.raises(C.ConfigError, match="1,000,000,001 optimizer steps, more than the limit"):
        C.build(CIFAR, {"train.batch_size": 50000, "scheduler.epochs": C.MAX_TOTAL_STEPS + 1})


def test_the_plan_refuses_a_run_past_the_limit_with_its_real_steps_per_epoch():
    with pytest.raises(ValueError, match=r"scheduler.epochs 1000000 x 10000 steps per epoch .* limit of 1,000,000,000"):
        SchedulePlan.from_config(sched(type="cosine", epochs=10**6), 10**4)


def test_a_long_run_keeps_no_curve_in_memory():
    """10^7 steps: a precomputed curve would hold 10^7 Python floats (hundreds of MB)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    plan = SchedulePlan.from_config(sched(type="cosine", epochs=10**4, lr_min_factor=0.0), 1000)
    tracemalloc.start()
    try:
        lr = PerIterationLR(opt, plan)
        for _ in range(10):
            opt.step()
            lr.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 * (1 + math.cos(math.pi * 10 / 10**7))
    assert not any(isinstance(v, (list, torch.Tensor)) and len(v) > 100 for v in vars(lr).values())
    assert len(repr(lr.state_dict())) < 2000


def test_sgdr_with_t0_1_over_300k_epochs_answers_at_once():
    with within(30):
        plan = SchedulePlan.from_config(sched(type="sgdr", epochs=300_000, T0=1, T_mul=1.0, lr_min_factor=0.0), 4)
        values = [plan.factor(s) for s in (0, 1, 2, 3, 4, 5, 599_999, 600_000, 1_199_999, 1_200_000)]
    assert plan.cycle_steps == (4,)  # one length for every cycle: nothing listed per cycle
    cycle = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    # a cycle's last step holds eta_min; the next step restarts at 1 step into the next cycle
    assert values == [1.0, cycle[1], cycle[2], cycle[3], 0.0, cycle[1], cycle[3], 0.0, cycle[3], 0.0]


def test_sgdr_lists_only_the_cycles_whose_length_grows():
    with within(30):
        assert SchedulePlan.from_config(sched(type="sgdr", epochs=10_000, T0=1, T_mul=1.0), 1).cycle_steps == (1,)
        # int(1 * 1.5) = 1: the length never grows
        assert SchedulePlan.from_config(sched(type="sgdr", epochs=10_000, T0=1, T_mul=1.5), 1).cycle_steps == (1,)
        assert SchedulePlan.from_config(sched(type="sgdr", epochs=100, T0=2, T_mul=2.0), 3).cycle_steps == (
            6, 12, 24, 48, 96, 192)


def _explicit_sgdr(s: C.SchedulerConfig, spe: int) -> list[float]:
    """Every cycle listed, the cycle of a step found by a scan: the definition, for comparison."""
    cycles = [s.T0]
    while sum(cycles) < s.epochs:
        cycles.append(max(int(cycles[-1] * s.T_mul), 1))
    out, m = [], s.lr_min_factor
    for tau in range(s.epochs * spe + 1):
        end = 0
        for c in cycles:
            end += c * spe
            if end >= tau:
                break
        start = end - c * spe
        out.append(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * ((tau - start) / (c * spe)))))
    return out


@pytest.mark.parametrize(("t0", "t_mul", "epochs"), [(1, 1.0, 40), (3, 1.0, 40), (1, 1.5, 40), (2, 1.5, 60),
                                                     (2, 2.0, 62), (3, 1.3, 50), (5, 2.0, 7)])
def test_sgdr_lookup_equals_the_explicit_cycles(t0, t_mul, epochs):
    s = sched(type="sgdr", epochs=epochs, T0=t0, T_mul=t_mul, lr_min_factor=0.001)
    plan = SchedulePlan.from_config(s, 3)
    assert [plan.factor(t) for t in range(epochs * 3 + 1)] == _explicit_sgdr(s, 3)


@pytest.mark.parametrize("kw", [dict(type="cosine"), dict(type="multistep", milestones=[3, 7]),
                                dict(type="linear", lr_min_factor=0.0), dict(type="sgdr", T0=2, T_mul=2.0),
                                dict(type="cosine", step_before_update=True, lr_min_factor=0.0),
                                dict(type="multistep", milestones=[3, 7], warmup=C.WarmupConfig("linear", 2))])
def test_the_scheduler_steps_through_the_per_step_closed_form(kw):
    plan = SchedulePlan.from_config(sched(epochs=10, **kw), 7)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    lr = PerIterationLR(opt, plan)
    seen = []
    for _ in range(75):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lr.step()
    assert seen == [0.3 * plan.factor(s) for s in range(75)]
    assert plan.factors(torch.arange(75)).tolist() == [plan.factor(s) for s in range(75)]


def test_an_sgdr_t_mul_that_overflows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"scheduler.T_mul: 1e\+308 makes an SGDR cycle infinitely long"):
        SchedulePlan.from_config(sched(type="sgdr", epochs=100, T0=10, T_mul=1e308), 1)
