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
