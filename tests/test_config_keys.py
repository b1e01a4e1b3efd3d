"""Every config key does something or is refused: the reference's validation-set switches
(train.val_ratio, train.use_test_as_val, train.val_first), TensorBoard logging and train.start_epoch,
and a census of the whole schema."""
from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import DIGITS, REPO, TINY, make_run

from imgclf import config as C
from imgclf.engine import Trainer, train
from imgclf.engine.evaluator import evaluate
from imgclf.engine.batches import validation_split
from imgclf.engine.results import Board


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "train_log.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- the validation split
def test_validation_split_is_the_references_random_split_from_the_seed():
    train_idx, val_idx = validation_split(1347, 0.2, seed=3)
    assert len(val_idx) == int(1347 * 0.2) == 269 and len(train_idx) == 1347 - 269
    assert sorted(torch.cat([train_idx, val_idx]).tolist()) == list(range(1347))  # disjoint, complete
    a, b = torch.utils.data.random_split(range(1347), [1347 - 269, 269], generator=torch.Generator().manual_seed(3))
    assert train_idx.tolist() == list(a.indices) and val_idx.tolist() == list(b.indices)
    assert torch.equal(validation_split(1347, 0.2, seed=3)[1], val_idx)  # a pure function of the seed
    assert not torch.equal(validation_split(1347, 0.2, seed=4)[1], val_idx)


def test_val_ratio_trains_on_the_rest_and_validates_on_the_held_out_split(tmp_path):
    run = make_run(tmp_path / "run", **{"train.use_test_as_val": False, "train.val_ratio": 0.2,
                                        "scheduler.epochs": 1, "train.batch_size": 64})
    trainer = Trainer(run, progress=False)
    n_train = len(trainer.data.train_labels)
    assert len(trainer.val_labels) == int(n_train * 0.2)
    assert len(trainer.loader) == (n_train - int(n_train * 0.2)) // 64  # drop_last over the rest
    result = trainer.fit()
    row = log_rows(run)[-1]
    assert result["val_error"] == pytest.approx(float(row["test_error"]))  # the log scored the split
    model = trainer.model
    on_test = evaluate(model, trainer.test_images, trainer.test_labels, trainer.eval_transform, batch_size=512,
                       precision=trainer.precision)
    on_val = evaluate(model, trainer.val_images, trainer.val_labels, trainer.eval_transform, batch_size=512,
                      precision=trainer.precision)
    assert result["test_error"] == pytest.approx(on_test["test_error"])  # the result is the test set's
    assert result["val_error"] == pytest.approx(on_val["test_error"])
    assert json.loads((run / "result.json").read_text())["test_error"] == result["test_error"]


@pytest.mark.parametrize("overrides, message", [
    ({"train.val_ratio": 0.1}, "train.val_ratio: 0.1 has no effect while train.use_test_as_val is True"),
    ({"train.use_test_as_val": False}, "train.use_test_as_val: False needs train.val_ratio"),
    ({"train.start_epoch": 5}, "train.start_epoch: 5 is not supported"),
])
def test_switch_combinations_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.build(DIGITS, overrides)


# --------------------------------------------------------------------------- val_first
def test_val_first_scores_the_initial_weights_without_changing_training(tmp_path):
    plain = make_run(tmp_path / "plain", **{"scheduler.epochs": 1})
    first = make_run(tmp_path / "first", **{"scheduler.epochs": 1, "train.val_first": True})
    train(plain, progress=False)
    trainer = Trainer(first, progress=False)
    initial = evaluate(trainer.model, trainer.test_images, trainer.test_labels, trainer.eval_transform,
                       batch_size=512, precision=trainer.precision)
    trainer.fit()
    rows = log_rows(first)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[0]["test_error"]) == pytest.approx(initial["test_error"])
    assert math.isnan(float(rows[0]["train_loss"]))
    assert rows[1] | {"epoch_seconds": "", "images_per_second": ""} == \
        log_rows(plain)[0] | {"epoch_seconds": "", "images_per_second": ""}
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (plain, first))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- tensorboard
def test_use_tensorboard_writes_the_references_scalars_beside_the_log(tmp_path):
    pytest.importorskip("tensorboard")  # [dev]; the runtime-only install is covered below
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = make_run(tmp_path / "run", **{"scheduler.epochs": 2, "train.use_tensorboard": True,
                                        "train.val_first": True})
    train(run, progress=False)
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(run))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    rows = log_rows(run)
    assert set(scalars) == {"Train/Loss", "Train/Acc1", "Train/Time", "Train/LearningRate", "Val/Loss", "Val/Acc1"}
    assert [s for s, _ in scalars["Val/Acc1"]] == [0, 1, 2] and [s for s, _ in scalars["Train/Loss"]] == [1, 2]
    for (step, value), row in zip(scalars["Val/Acc1"], rows):
        assert value == pytest.approx(1 - float(row["test_error"]) / 100, abs=1e-6)
    for (step, value), row in zip(scalars["Train/Loss"], rows[1:]):
        assert value == pytest.approx(float(row["train_loss"]), rel=1e-6)


def test_use_tensorboard_without_tensorboard_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ValueError, match=r"^train.use_tensorboard: needs the tensorboard package"):
        Board(tmp_path, purge_step=None)
    import importlib.util

    from imgclf.runs import preflight

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else object())
    with pytest.raises(C.ConfigError, match=r"^train.use_tensorboard: needs the tensorboard package"):
        preflight(C.build(DIGITS, {**TINY, "train.use_tensorboard": True}))


# --------------------------------------------------------------------------- the census
# Keys the code accepts and deliberately does not read, each with why. Everything else must be
# read somewhere in src/ (outside config.py, which only declares and validates) or be refused.
ACCEPTED_UNREAD = {
    "train.use_apex": "the reference's apex switch; train.precision (O0..O3 included) decides",
    "train.dataloader.num_workers": "data lives on the device; no worker processes to start",
    "train.dataloader.pin_memory": "data lives on the device; nothing to pin",
    "train.dataloader.non_blocking": "data lives on the device; no host-to-device copies per step",
    "validation.dataloader.num_workers": "as train.dataloader.num_workers",
    "validation.dataloader.pin_memory": "as train.dataloader.pin_memory",
    "validation.dataloader.non_blocking": "as train.dataloader.non_blocking",
    "train.dist.node_rank": "the reference's launch option; torchrun/SLURM's environment gives the rank",
}
# Keys whose non-default values are refused, with a value that shows it.
REFUSED_NON_DEFAULT = {"train.start_epoch": 3, "train.capturable_step": True}


def _source_without_config() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "src" / "imgclf").rglob("*.py")) if p.name != "config.py")


def test_every_schema_key_is_read_refused_or_listed_with_a_reason():
    source = _source_without_config()
    unread = []
    for key in C.all_keys():
        leaf = re.escape(key.rsplit(".", 1)[-1])
        read = re.search(rf"\.{leaf}\b|[\"']{leaf}[\"']|\b{leaf}=", source)
        if key in REFUSED_NON_DEFAULT:
            with pytest.raises(C.ConfigError, match=re.escape(key)):
                C.build(DIGITS, {key: REFUSED_NON_DEFAULT[key]})
        elif key in ACCEPTED_UNREAD:
            assert not read, f"{key} is read now: take it off ACCEPTED_UNREAD"
        elif not read:
            unread.append(key)
    assert not unread, f"accepted but read nowhere (implement, refuse or justify): {unread}"
    assert set(ACCEPTED_UNREAD) | set(REFUSED_NON_DEFAULT) <= set(C.all_keys())


def test_the_reference_switches_change_what_a_run_does():
    """The five switches that were accepted and ignored: each non-default value changes the
    trainer's behaviour (asserted by the tests above) or is refused; here, that none of them moved
    the default run id (all of them off, as before)."""
    cfg = C.build(DIGITS, TINY)
    assert (cfg.train.val_ratio, cfg.train.use_test_as_val, cfg.train.val_first, cfg.train.start_epoch,
            cfg.train.use_tensorboard) == (0.0, True, False, 0, False)
    other = C.build(DIGITS, {**TINY, "train.val_first": True})
    assert C.config_hash(other) != C.config_hash(cfg)  # it changes the log, so it is its own run


def test_status_does_not_count_val_firsts_row_as_a_trained_epoch(tmp_path):
    from imgclf.status import _epochs_done

    (tmp_path / "train_log.csv").write_text("epoch,lr\n0,0.1\n1,0.1\n2,0.1\n")
    assert _epochs_done(tmp_path) == 2
    (tmp_path / "train_log.csv").write_text("epoch,lr\n1,0.1\n")
    assert _epochs_done(tmp_path) == 1
