"""Options of the GPU speed path that must not change a table's number, proven on CPU."""
import csv
import math

import pytest
import torch

from conftest import make_run, stop_during_step
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


_AUG = {"augmentation.use_mixup": True, "augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4}


def _stop_after(trainer, n_steps):
    """Request a stop after the n-th training step (whenever the batches were augmented)."""
    stop_during_step(trainer, n_steps, trainer.stop_event)


def test_whole_epoch_augmentation_buffer_trains_bit_identically_and_resumes_mid_epoch(tmp_path):
    """train.epoch_augmentation: the epoch's batches are made at its start, with the per-step
    path's (seed, epoch, step) draws, so the weights and the log are the per-step run's, bit for
    bit; stopped at epoch 2 step 4 and resumed (the buffer made for the rest of the epoch), too."""
    import threading

    from imgclf.engine import Preempted, Trainer

    overrides = {"scheduler.epochs": 2, **_AUG}
    plain = make_run(tmp_path / "plain", **overrides)
    train(plain, progress=False)
    whole = make_run(tmp_path / "buffer", **overrides, **{"train.epoch_augmentation": True})
    made = []
    trainer = Trainer(whole, progress=False)
    inner = trainer.batches.fits
    trainer.batches.fits = lambda start: made.append(inner(start)) or made[-1]
    trainer.fit()
    assert made == [True, True]  # the buffer was used in both epochs
    stopped = make_run(tmp_path / "stopped", **overrides, **{"train.epoch_augmentation": True})
    trainer = Trainer(stopped, progress=False, stop_event=threading.Event())
    _stop_after(trainer, 14)
    with pytest.raises(Preempted, match="epoch 2 step 4"):
        trainer.fit()
    del trainer
    train(stopped, progress=False)
    wa = torch.load(plain / "model.pt", weights_only=True)
    for run in (whole, stopped):
        wb = torch.load(run / "model.pt", weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert [(r["train_loss"], r["test_error"]) for r in rows(run)] == \
            [(r["train_loss"], r["test_error"]) for r in rows(plain)]


def test_whole_epoch_augmentation_falls_back_to_per_step_above_its_memory_budget(tmp_path, caplog):
    run = make_run(tmp_path / "run", **{"scheduler.epochs": 1, "train.epoch_augmentation": True,
                                        "train.epoch_augmentation_max_gb": 1e-6})
    plain = make_run(tmp_path / "plain", **{"scheduler.epochs": 1})
    with caplog.at_level("WARNING", logger="imgclf.engine.batches"):
        assert train(run, progress=False)["train_loss"] == train(plain, progress=False)["train_loss"]
    lines = [r.getMessage() for r in caplog.records if "epoch_augmentation" in r.getMessage()]
    assert len(lines) == 1 and "more than train.epoch_augmentation_max_gb 1e-06; augmenting per step" in lines[0]


def test_capturable_step_is_refused_as_removed_and_its_default_keeps_every_run_id(tmp_path):
    """train.capturable_step was removed: True is one line saying so and what to use; False (the
    value every existing run directory's config.yaml holds) still loads, with the same run id."""
    from imgclf import config as C, runs

    with pytest.raises(C.ConfigError) as e:
        C.build(overrides={"train.capturable_step": True})
    message = str(e.value)
    assert message.startswith("override train.capturable_step: removed") and "train.compile True" in message
    assert "\n" not in message
    assert C.config_hash(C.build(overrides={"train.capturable_step": False})) == C.config_hash(C.build())
    run = make_run(tmp_path / "run")
    assert "capturable_step: false" in (run / "config.yaml").read_text()
    assert runs.load_run_config(run).train.capturable_step is False


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("amp", torch.float16)])
def test_whole_epoch_augmentation_buffer_holds_the_autocast_dtype_and_trains_bit_identically(
        tmp_path, precision, dtype):
    """Under autocast the buffer holds bf16 / fp16 inputs (half the memory): the first convolution
    casts its input to that dtype anyway, so the weights equal the per-step path's."""
    from imgclf.engine import Trainer

    overrides = {"scheduler.epochs": 1, "train.precision": precision}
    plain = make_run(tmp_path / "plain", **overrides)
    train(plain, progress=False)
    run = make_run(tmp_path / "buffer", **overrides, **{"train.epoch_augmentation": True})
    trainer = Trainer(run, progress=False)
    dtypes = []
    inner = trainer.step.body
    trainer.step.body = lambda batch: dtypes.append(batch.images.dtype) or inner(batch)
    trainer.fit()
    assert set(dtypes) == {dtype}
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (plain, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
