"""train.epoch_augmentation_draws batched: the per-sample transforms of many steps in one call.
Other draws than the per-step path, the same distributions; resumable bit for bit."""
import csv
import threading

import numpy as np
import pytest
import torch

from conftest import make_run, stop_during_step
from imgclf import config as C
from imgclf.augment.pipeline import TrainTransform
from imgclf.data import derive_seed
from imgclf.engine import Preempted, Trainer, train
from imgclf.engine import batches as batches_module

H = 15  # synthetic images: pixel (y, x) holds y * H + x + 1, so an output pixel names its source


def _transform(**aug):
    cfg = C.build(overrides={"augmentation.random_crop.padding": 2, **aug})
    return TrainTransform(cfg.augmentation, [0.0], [1.0 / 255], 10, H, torch.device("cpu"))


def _images(n):
    grid = (torch.arange(H)[:, None] * H + torch.arange(H) + 1).float()
    return grid.expand(n, 1, H, H).clone()


def _both_paths(transform, steps=100, batch=128):
    """(per-step outputs, batched outputs) of ``steps`` batches: one call per step from the step's
    generator, and one call over all of them, as the trainer seeds them."""
    per_step = torch.cat([transform.per_sample(_images(batch), torch.Generator().manual_seed(derive_seed(0, 0, s)))
                          for s in range(steps)])
    batched = transform.per_sample(_images(steps * batch), torch.Generator().manual_seed(derive_seed(0, 0, 0, 1)))
    return per_step, batched


def _chi2_same(a, b):
    """Two-sample chi-square on discrete values (bins with < 10 in both pooled into one):
    True when the statistic stays below the p = 0.001 critical value (Wilson-Hilferty)."""
    values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ca = np.bincount(inverse[:len(a)], minlength=len(values)).astype(float)
    cb = np.bincount(inverse[len(a):], minlength=len(values)).astype(float)
    small = ca + cb < 10
    ca = np.append(ca[~small], ca[small].sum())
    cb = np.append(cb[~small], cb[small].sum())
    keep = ca + cb > 0
    ca, cb = ca[keep], cb[keep]
    stat = (((ca - cb) ** 2) / (ca + cb)).sum()
    df = len(ca) - 1
    crit = df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3
    return stat < crit, stat, crit


def _features(x, mask_color):
    """Per sample: the source of the corner and centre pixels (crop offset x flip x cutout there),
    the masked area and the first masked row and column (cutout's position, clipped)."""
    x = x[:, 0]
    masked = x == mask_color
    any_row, any_col = masked.any(2), masked.any(1)
    first_row = torch.where(any_row.any(1), any_row.float().argmax(1), -1)
    first_col = torch.where(any_col.any(1), any_col.float().argmax(1), -1)
    return {"corner": x[:, 0, 0], "centre": x[:, H // 2, H // 2], "area": masked.sum((1, 2)),
            "first_row": first_row, "first_col": first_col}


_CUT = {"augmentation.use_cutout": True, "augmentation.cutout.mask_size": 6, "augmentation.cutout.prob": 0.5,
        "augmentation.cutout.mask_color": 0, "augmentation.random_crop.fill": 255}


def test_batched_draws_have_the_per_step_distributions():
    """12800 samples each: crop offsets, flip and cutout position (seen through the corner and
    centre pixels' sources, the masked area and first masked row/column) pass a chi-square test
    between the paths; a flip probability of 0.6 instead of 0.5 fails it (the test has power)."""
    per_step, batched = _both_paths(_transform(**_CUT))
    fa, fb = _features(per_step, 0.0), _features(batched, 0.0)
    assert not torch.equal(per_step, batched)  # other draws
    for name in fa:
        same, stat, crit = _chi2_same(fa[name].numpy(), fb[name].numpy())
        assert same, f"{name}: chi2 {stat:.1f} >= {crit:.1f}"
    skewed = _transform(**_CUT, **{"augmentation.random_horizontal_flip.prob": 0.6})
    fs = _features(skewed.per_sample(_images(12800), torch.Generator().manual_seed(7)), 0.0)
    assert not _chi2_same(fa["corner"].numpy(), fs["corner"].numpy())[0]


def test_batched_random_erasing_has_the_per_step_distribution():
    per_step, batched = _both_paths(_transform(**{"augmentation.use_random_crop": False,
                                                  "augmentation.use_random_horizontal_flip": False,
                                                  "augmentation.use_random_erasing": True}))
    source = _images(1)
    for x in (per_step, batched):
        assert x.shape[0] == 12800
    erased_a, erased_b = per_step != source, batched != source
    for feature in (lambda e: e.sum((1, 2, 3)), lambda e: e.any(3)[:, 0].float().argmax(1),
                    lambda e: e.any(2)[:, 0].float().argmax(1)):
        same, stat, crit = _chi2_same(feature(erased_a).numpy(), feature(erased_b).numpy())
        assert same, f"chi2 {stat:.1f} >= {crit:.1f}"


_AUG = {"augmentation.use_mixup": True, "augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4}
_BATCHED = {"train.epoch_augmentation": True, "train.epoch_augmentation_draws": "batched"}


def _weights(run):
    return torch.load(run / "model.pt", weights_only=True)


def _rows(run):
    with open(run / "train_log.csv") as f:
        return [(r["train_loss"], r["test_error"]) for r in csv.DictReader(f)]


def test_batched_mode_is_its_own_run_and_needs_the_epoch_buffer():
    off = C.config_hash(C.build(overrides={}))
    assert C.config_hash(C.build(overrides={"train.epoch_augmentation": True})) == off
    assert C.config_hash(C.build(overrides=_BATCHED)) != off
    with pytest.raises(C.ConfigError, match="epoch_augmentation_draws: batched needs train.epoch_augmentation"):
        C.build(overrides={"train.epoch_augmentation_draws": "batched"})
    with pytest.raises(C.ConfigError, match="is not one of per_step, batched"):
        C.build(overrides={"train.epoch_augmentation": True, "train.epoch_augmentation_draws": "whole"})


def test_batched_mode_resumes_bit_exactly_and_its_memory_fallback_draws_the_same(tmp_path, monkeypatch, caplog):
    """Chunks of 3 steps: stopped at epoch 2 step 4 (inside the second chunk) and resumed, and
    made one chunk at a time above the memory budget: the uninterrupted resident run's weights
    and log, bit for bit; and not the per-step path's."""
    monkeypatch.setattr(batches_module, "BATCHED_CHUNK_SAMPLES", 3 * 128)
    overrides = {"scheduler.epochs": 2, **_AUG, **_BATCHED}
    whole = make_run(tmp_path / "whole", **overrides)
    train(whole, progress=False)
    per_step = make_run(tmp_path / "per_step", **{**overrides, "train.epoch_augmentation_draws": "per_step"})
    train(per_step, progress=False)
    assert _rows(per_step) != _rows(whole)

    stopped = make_run(tmp_path / "stopped", **overrides)
    trainer = Trainer(stopped, progress=False, stop_event=threading.Event())
    stop_during_step(trainer, 14, trainer.stop_event)  # epoch 2, step 4
    with pytest.raises(Preempted, match="epoch 2 step 4"):
        trainer.fit()
    del trainer
    train(stopped, progress=False)

    low = make_run(tmp_path / "low", **overrides, **{"train.epoch_augmentation_max_gb": 1e-6})
    with caplog.at_level("WARNING", logger="imgclf.engine.batches"):
        train(low, progress=False)
    assert any("making one chunk at a time" in r.getMessage() for r in caplog.records)
    wa = _weights(whole)
    for run in (stopped, low):
        wb = _weights(run)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert _rows(run) == _rows(whole)


def test_batched_mode_trains_to_the_per_step_error(tmp_path):
    """Digits, the tiny model, 6 epochs with cutout, 3 seeds: the mean final test error (%) of the
    batched draws is the per-step path's within 3 points."""
    errors = {}
    for mode in ("per_step", "batched"):
        errors[mode] = []
        for seed in (0, 1, 2):
            run = make_run(tmp_path / f"{mode}{seed}", **{
                "scheduler.epochs": 6, "augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4,
                "train.seed": seed, "train.epoch_augmentation": True, "train.epoch_augmentation_draws": mode})
            errors[mode].append(train(run, progress=False)["test_error"])
    print(errors)
    assert abs(np.mean(errors["batched"]) - np.mean(errors["per_step"])) <= 3.0, errors


def test_batched_mode_gives_every_rank_its_shard_of_the_same_draws(tmp_path):
    """Under DDP each rank makes the global batches from the same generators and keeps every
    world_size-th sample: rank r's batch is the single-process batch's r::2 rows, mixup included."""
    run = make_run(tmp_path / "run", **_AUG, **_BATCHED)
    trainer = Trainer(run, progress=False)
    source = trainer.batches
    whole = [(s, make()) for s, make in source.epoch(0)]
    assert len(whole) == len(trainer.loader)
    for rank in (0, 1):
        source.rank, source.world_size = rank, 2
        shard = [(s, make()) for s, make in source.epoch(0)]
        assert [s for s, _ in shard] == [s for s, _ in whole]
        for (_, a), (_, b) in zip(whole, shard):
            assert torch.equal(b.images, a.images[rank::2]) and torch.equal(b.targets, a.targets[rank::2])
