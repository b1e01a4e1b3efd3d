"""Schedules: for every table row, our learning rate at every optimizer step equals the
reference scheduler's (its ``create_scheduler``: a ``LambdaLR`` over combined pieces).

Rows are enumerated through imgclf's own table specs; rows with the same schedule and steps per
epoch are compared once. The whole curve of a run (steps 0 .. epochs * steps_per_epoch) is
compared as one array: ours from ``SchedulePlan.factors``, the reference's from its own pieces
(oracle.reference_schedule_factors), which a spot check ties to its per-step ``__call__``.

The batch-size, LARS and no-weight-decay-on-BN tables were trained by the reference's train.py of
January 2019 (hysts/pytorch_image_classification at 1d76092), whose scheduler differs: those rows
set ``scheduler.step_before_update`` and are compared with that code's schedule instead.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imgclf import config as C
from imgclf.optim.schedules import SchedulePlan
from imgclf.tables import spec as S
from oracle import (
    RECIPES,
    REPO,
    TRAIN_SIZES,
    reference_config,
    reference_recipe_exists,
    reference_schedule_factor_scalar,
    reference_schedule_factors,
)

SCHEDULE_KEYS = ("epochs", "type", "milestones", "lr_decay", "lr_min_factor", "T0", "T_mul")
WARMUP_KEYS = ("type", "epochs", "start_factor", "exponent")


def _rows():
    return [(name, row) for name, table in S.load_all(REPO / "config" / "tables", RECIPES).items()
            for row in table.rows]


def _ref_cfg_from_ours(ref, sched: C.SchedulerConfig, base_lr: float):
    """The reference's default config carrying our resolved schedule (the scheduler reads nothing else)."""
    cfg = ref.get_default_config()
    for key in SCHEDULE_KEYS:
        setattr(cfg.scheduler, key, getattr(sched, key))
    for key in WARMUP_KEYS:
        setattr(cfg.scheduler.warmup, key, getattr(sched.warmup, key))
    cfg.train.base_lr = base_lr
    return cfg


def _compare(ref, sched: C.SchedulerConfig, base_lr: float, spe: int, *, spot_checks: int = 0) -> None:
    total = sched.epochs * spe
    steps = np.arange(total + 1)
    ours = SchedulePlan.from_config(sched, spe).factors(torch.from_numpy(steps)).numpy()
    cfg = _ref_cfg_from_ours(ref, sched, base_lr)
    theirs = reference_schedule_factors(ref, cfg, spe, steps)
    if sched.warmup.type == "exponential" and sched.warmup.epochs > 0:
        # the reference's exponential warmup piece carries base_lr inside a LambdaLR that applies it
        # again (lr = base_lr**2 * ...); imgclf keeps the shape and applies base_lr once
        warm = steps <= sched.warmup.epochs * spe  # the boundary step belongs to the warmup piece
        theirs[warm] /= base_lr
    bad = np.flatnonzero(~np.isclose(ours, theirs, rtol=1e-9, atol=1e-12))
    assert bad.size == 0, (f"{json.dumps(dataclass_dict(sched))} at {spe} steps/epoch: first differing step "
                           f"{bad[0]} of {total}: ours {ours[bad[0]]!r}, reference {theirs[bad[0]]!r}")
    if spot_checks:
        rng = np.random.default_rng(0)
        picks = set(rng.integers(0, total + 1, spot_checks).tolist())
        picks |= {0, total, total - 1}
        picks |= {m * spe + d for m in sched.milestones for d in (-1, 0, 1) if 0 <= m * spe + d <= total}
        for s in sorted(picks):
            assert reference_schedule_factor_scalar(ref, cfg, spe, s) == pytest.approx(
                float(_vectorised_reference(ref, cfg, spe, s)), rel=1e-12)


def _vectorised_reference(ref, cfg, spe, step):
    return reference_schedule_factors(ref, cfg, spe, np.array([step]))[0]


def dataclass_dict(sched):
    return {k: getattr(sched, k) for k in SCHEDULE_KEYS + ("step_before_update",)} | {
        "warmup": {k: getattr(sched.warmup, k) for k in WARMUP_KEYS}}


def test_every_table_row_has_the_reference_lr_at_every_step(ref):
    seen: dict[str, tuple] = {}
    for _, row in _rows():
        cfg = row.config
        if cfg.scheduler.step_before_update:
            continue  # trained by the 2019 code: test_rows_of_the_2019_code_have_its_lr_at_every_step
        spe = TRAIN_SIZES[cfg.dataset.name] // cfg.train.batch_size  # drop_last, as both engines
        key = json.dumps([dataclass_dict(cfg.scheduler), spe], sort_keys=True)
        seen.setdefault(key, (cfg.scheduler, cfg.train.base_lr, spe))
    assert len(seen) > 10  # every distinct schedule of the rows the later code trained
    types = {s.type for s, _, _ in seen.values()}
    assert types == {"multistep", "cosine"}, types  # what the tables train; the rest is swept below
    for i, (sched, base_lr, spe) in enumerate(seen.values()):
        _compare(ref, sched, base_lr, spe, spot_checks=20 if i < 5 else 0)


def test_table_rows_resolve_to_the_reference_schedule(ref):
    """Our recipe + a row's overrides give the schedule that the reference's recipe + the same
    overrides give (catches a recipe default that drifted, e.g. milestones)."""
    checked = set()
    for name, row in _rows():
        key = json.dumps([row.recipe, row.overrides], sort_keys=True, default=str)
        if key in checked or not reference_recipe_exists(row.recipe):
            continue
        checked.add(key)
        theirs = reference_config(ref, row.recipe, _known_to_reference(ref, row.overrides))
        ours = row.config
        where = f"{name}/{row.id}"
        for k in SCHEDULE_KEYS:
            assert list_or_value(getattr(ours.scheduler, k)) == list_or_value(getattr(theirs.scheduler, k)), (where, k)
        for k in WARMUP_KEYS:
            assert getattr(ours.scheduler.warmup, k) == getattr(theirs.scheduler.warmup, k), (where, k)
        assert ours.train.base_lr == theirs.train.base_lr, where
    assert len(checked) > 100


def _known_to_reference(ref, overrides: dict) -> dict:
    """The overrides without imgclf's own options (e.g. train.dist.mixer_per_rank), which the
    reference does not have and which do not touch the schedule."""
    defaults = ref.get_default_config()

    def known(key):
        node = defaults
        for part in key.split("."):
            if part not in node:
                return False
            node = node[part]
        return True

    return {k: v for k, v in overrides.items() if known(k)}


def list_or_value(v):
    return list(v) if isinstance(v, (list, tuple)) else v


@pytest.mark.parametrize("warmup", [("none", 0, 0.001, 4.0), ("linear", 5, 0.001, 4.0), ("linear", 3, 0.1, 4.0),
                                    ("exponential", 5, 0.001, 4.0), ("exponential", 2, 0.01, 2.0)])
@pytest.mark.parametrize("main", [
    {"type": "constant"}, {"type": "multistep", "milestones": [80, 120], "lr_decay": 0.1},
    {"type": "multistep", "milestones": [3, 50, 150], "lr_decay": 0.2}, {"type": "linear", "lr_min_factor": 0.001},
    {"type": "linear", "lr_min_factor": 0.0}, {"type": "cosine", "lr_min_factor": 0.001},
    {"type": "sgdr", "T0": 10, "T_mul": 1.0, "lr_min_factor": 0.001},
    {"type": "sgdr", "T0": 5, "T_mul": 2.0, "lr_min_factor": 0.0},
])
def test_every_schedule_shape_matches_the_reference(ref, warmup, main):
    """The shapes no table row trains: constant, linear, SGDR, linear and exponential warmup."""
    sched = C.SchedulerConfig()
    sched.warmup.type, sched.warmup.epochs, sched.warmup.start_factor, sched.warmup.exponent = warmup
    for k, v in main.items():
        setattr(sched, k, v)
    # the reference's SGDR needs its cycles to fill the main schedule exactly
    sched.epochs = warmup[1] + (75 if main.get("T_mul") == 2.0 else 160)
    for spe in (1, 7, 390):
        _compare(ref, sched, 0.4, spe, spot_checks=10 if spe == 7 else 0)


# --------------------------------------------------------------------------- the 2019 train.py
# The tables that the reference's train.py of January 2019 trained (the README's batch-size and
# learning-rate experiments). Its schedule, from utils._get_scheduler and train.train at 1d76092:
#   cosine:    LambdaLR(lambda step: cosine_annealing(step, epochs * steps_per_epoch, 1, lr_min / base_lr)),
#              with --lr_min 0 by default, and scheduler.step() called BEFORE each optimizer step;
#   multistep: MultiStepLR(milestones, lr_decay), scheduler.step(epoch - 1) (epoch 1-based) before
#              each optimizer step.
TABLES_OF_2019 = ("batch_size_lr_", "lars_", "no_weight_decay_on_bn_")


def _cosine_annealing_2019(step, total_steps, lr_max, lr_min):
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + np.cos(step / total_steps * np.pi))


def _factors_2019(sched: C.SchedulerConfig, spe: int, steps: np.ndarray) -> np.ndarray:
    """The 2019 code's lr / base_lr at each optimizer step (0-based), in closed form."""
    if sched.type == "cosine":
        # LambdaLR's constructor takes step 0; the first update runs after one more step()
        return _cosine_annealing_2019(steps + 1, sched.epochs * spe, 1, 0.0)
    assert sched.type == "multistep", sched.type
    # MultiStepLR at last_epoch = epoch - 1 = the 0-based epoch: gamma ** bisect_right(milestones, epoch0)
    passed = np.searchsorted(np.array(sched.milestones), steps // spe, side="right")
    return sched.lr_decay ** passed.astype(np.float64)


def _simulate_2019(sched: C.SchedulerConfig, spe: int, base_lr: float) -> np.ndarray:
    """The 2019 training loop's learning rate at each optimizer step, by running torch's own
    schedulers as it did (ties :func:`_factors_2019` to the mechanics)."""
    import warnings

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    total = sched.epochs * spe
    if sched.type == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: _cosine_annealing_2019(step, total, 1, 0.0 / base_lr))
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(sched.milestones),
                                                         gamma=sched.lr_decay)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) and step-before-optimizer are deprecated usages
        for epoch in range(1, sched.epochs + 1):
            for _ in range(spe):
                if sched.type == "cosine":
                    scheduler.step()
                else:
                    scheduler.step(epoch - 1)
                lrs.append(opt.param_groups[0]["lr"])
    return np.array(lrs) / base_lr


def _rows_of_2019():
    return [(name, row) for name, row in _rows() if name.startswith(TABLES_OF_2019)]


def test_rows_of_the_2019_code_have_its_lr_at_every_step():
    rows = _rows_of_2019()
    assert len(rows) > 150 and all(row.config.scheduler.step_before_update for _, row in rows)
    # every other table was trained by the later code (the oracle's)
    assert not any(row.config.scheduler.step_before_update for name, row in _rows()
                   if not name.startswith(TABLES_OF_2019))
    seen: dict[str, tuple] = {}
    for _, row in rows:
        cfg = row.config
        spe = TRAIN_SIZES[cfg.dataset.name] // cfg.train.batch_size
        key = json.dumps([dataclass_dict(cfg.scheduler), spe], sort_keys=True)
        seen.setdefault(key, (cfg.scheduler, cfg.train.base_lr, spe))
    assert {s.type for s, _, _ in seen.values()} == {"multistep", "cosine"}
    for sched, _, spe in seen.values():
        assert sched.warmup.type == "none" or sched.warmup.epochs == 0  # the 2019 code had no warmup
        steps = np.arange(sched.epochs * spe)
        ours = SchedulePlan.from_config(sched, spe).factors(torch.from_numpy(steps)).numpy()
        theirs = _factors_2019(sched, spe, steps)
        bad = np.flatnonzero(~np.isclose(ours, theirs, rtol=1e-9, atol=1e-12))
        assert bad.size == 0, (f"{json.dumps(dataclass_dict(sched))} at {spe} steps/epoch: first differing step "
                               f"{bad[0]}: ours {ours[bad[0]]!r}, the 2019 code's {theirs[bad[0]]!r}")


@pytest.mark.parametrize("kind", ["cosine", "multistep"])
def test_the_2019_closed_form_is_what_its_training_loop_ran(kind):
    table = "batch_size_lr_linear_scaling_multistep" if kind == "multistep" else "lars_4096"
    _, row = next((n, r) for n, r in _rows_of_2019() if n == table)
    sched = row.config.scheduler
    assert sched.type == kind
    spe = TRAIN_SIZES[row.config.dataset.name] // row.config.train.batch_size
    steps = np.arange(sched.epochs * spe)
    np.testing.assert_allclose(_simulate_2019(sched, spe, row.config.train.base_lr),
                               _factors_2019(sched, spe, steps), rtol=1e-12, atol=1e-15)
    if kind == "multistep":  # a milestone lowers the lr from the first step of its epoch
        m = sched.milestones[0] * spe
        ours = SchedulePlan.from_config(sched, spe).factors(torch.tensor([m - 1, m]))
        assert ours.tolist() == [1.0, sched.lr_decay]
