"""The engine's training step: a batch carries its view layout and the step asks the batch, not
the config; the benchmarks time this step, not an approximation of it."""
import sys

import pytest
import torch
import torch.nn as nn

from conftest import DIGITS, REPO, TINY
from imgclf import config as C, losses
from imgclf.augment.pipeline import Batch
from imgclf.engine.precision import Precision
from imgclf.engine.step import Step
from imgclf.optim import build_optimizer, build_scheduler

if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder beside src/, not an installed package
    sys.path.insert(0, str(REPO))


def two_views(n: int = 6) -> Batch:
    """Sample i of view v holds the value 10 * v + i everywhere."""
    images = torch.cat([torch.arange(n, dtype=torch.float32) + 10 * v for v in range(2)]).view(-1, 1, 1, 1)
    labels = torch.arange(n) % 3
    return Batch(images.expand(-1, 1, 2, 2).clone(), losses.one_hot(labels, 3), labels, views=2)


def values(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].long().tolist()


def test_a_two_view_batch_chunks_and_shards_the_same_samples_of_both_views():
    batch = two_views()
    assert len(batch) == 6
    assert values(batch.view_images(slice(2, 4))) == [2, 3, 12, 13]
    shard = batch.shard(1, 2)
    assert values(shard.images) == [1, 3, 5, 11, 13, 15] and shard.labels.tolist() == [1, 0, 2]
    assert shard.views == 2 and torch.equal(shard.targets, batch.targets[1::2])
    one = Batch(batch.images[:6], batch.targets, batch.labels)
    assert values(one.shard(1, 2).images) == [1, 3, 5] and one.shard(0, 1) is one


def test_the_transform_says_how_many_views_its_batches_hold():
    from imgclf.augment.pipeline import TrainTransform

    for dual, views in ((False, 1), (True, 2)):
        cfg = C.build(overrides={"augmentation.use_dual_cutout": dual, "augmentation.cutout.mask_size": 2})
        t = TrainTransform(cfg.augmentation, [0.0], [1.0], 3, 4, torch.device("cpu"))
        batch = t(torch.rand(5, 1, 4, 4), torch.arange(5) % 3, torch.Generator().manual_seed(0))
        assert t.views == batch.views == views and len(batch.images) == views * 5 and len(batch) == 5


def _step(alpha: float = 0.3) -> Step:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    cfg = C.build(overrides={"augmentation.cutout.dual_cutout_alpha": alpha})
    optimizer = build_optimizer(cfg, model)
    return Step.of(cfg, model, model, optimizer, build_scheduler(cfg, optimizer, 10),
                   Precision("fp32", torch.device("cpu")))


def test_the_step_takes_the_loss_of_the_batchs_view_layout():
    step, batch = _step(), two_views()
    logits = step.forward(batch.images)
    loss, _ = step.loss(logits, batch.targets, batch.views)
    assert torch.equal(loss, losses.dual_cutout_loss(logits.float(), batch.targets, 0.3))
    single, _ = step.loss(logits[:6], batch.targets, 1)
    assert torch.equal(single, losses.soft_cross_entropy(logits[:6].float(), batch.targets))
    with pytest.raises(ValueError, match="3 views"):
        step.loss(torch.cat([logits, logits[:6]]), batch.targets, 3)
    mean_loss, correct = step(batch)  # a whole step: both views forward, one update
    assert torch.isfinite(mean_loss) and 0 <= int(correct) <= 6 and step.scheduler.last_epoch == 1


def test_the_trainer_never_branches_on_dual_cutout():
    text = (REPO / "src" / "imgclf" / "engine" / "trainer.py").read_text().lower()
    assert "dual" not in text and "views" not in text


def test_the_model_benchmark_times_the_engines_step(monkeypatch):
    from benchmarks import models

    calls = []
    body = Step.body
    monkeypatch.setattr(Step, "body", lambda self, batch: calls.append(len(batch)) or body(self, batch))
    cfg = C.build(DIGITS, TINY)
    step, model = models.train_step(cfg, torch.device("cpu"), batch_size=4, channels_last=False)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert calls == [4] and any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
