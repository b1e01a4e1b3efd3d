"""Options of the GPU speed path that must not change a table's number, proven on CPU."""
import csv
import math

import torch

from conftest import make_run
from imgclf.engine import train


def rows(run):
    with open(run / "train_log.csv") as f:
        return list(csv.DictReader(f))


def test_evaluating_and_checkpointing_every_few_epochs_keeps_the_last_epoch_test_error(tmp_path):
    """train.val_period (the reference's name for the evaluation period) and train.checkpoint_period,
    in epochs: fewer evaluations and checkpoints, the same weights and the same last-epoch error."""
    every = make_run(tmp_path / "every", **{"scheduler.epochs": 3})
    sparse = make_run(tmp_path / "sparse", **{"scheduler.epochs": 3, "train.val_period": 2,
                                              "train.checkpoint_period": 2})
    a, b = train(every, progress=False), train(sparse, progress=False)
    assert b["test_error"] == a["test_error"] and b["test_loss"] == a["test_loss"]
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (every, sparse))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    evaluated = [not math.isnan(float(r["test_error"])) for r in rows(sparse)]
    assert evaluated == [False, True, True]  # epoch 2 (the period) and the last epoch
    assert torch.load(sparse / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_eval_period_is_the_reference_val_period_under_another_name(tmp_path):
    """train.eval_period is an alias: it sets train.val_period (one field, one value, one run id),
    from a recipe mapping or an override; the reference README's train.val_period keeps working."""
    from imgclf import config as C

    ref = C.build(overrides={"train.val_period": 3})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  eval_period: 3\n")
    for cfg in (C.build(overrides={"train.eval_period": 3}), C.build(recipe)):
        assert cfg.train.val_period == 3 and C.config_hash(cfg) == C.config_hash(ref)
        assert C.get_key(cfg, "train.eval_period") == 3
    assert C.Config().train.val_period == 1 and C.Config().train.checkpoint_period == 1  # every epoch
    try:
        C.build(overrides={"train.eval_period": 0})
    except C.ConfigError as e:
        assert str(e).startswith("override train.val_period") and "\n" not in str(e)
    else:
        raise AssertionError("eval_period 0 accepted")
