"""The multi-GPU rows (config/tables/cifar10_multi_gpu.yaml) under 2-rank DDP (gloo on CPU), against
the reference's own train.py run the same way.

What is compared is the DDP mechanics, not the augmentation's random draws: each rank of the
reference trains, with its train.py's ``train()`` under DistributedDataParallel, on exactly the
batches our ranks trained on (our per-rank RICAP output included), from the same initial weights.
So the per-rank shards, the gradient averaging, per-rank BatchNorm, the learning rate (no scaling
with the number of GPUs), the per-step schedule and the optimizer must agree for the weights to.
The sample order (sharding, no reshuffling between epochs) is compared against the reference's
DistributedSampler itself.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import pytest
import torch
from torch import nn

from imgclf import config as C, runs
from oracle import RECIPES, REFERENCE_DIR, REPO, paired_parameters, reference_config

WORLD = 2
GLOBAL_BATCH = 64  # 32 per rank, as the row's 512 = 256 x 2
TINY_WRN = {"model.wrn.depth": 10, "model.wrn.widening_factor": 1}


def _our_overrides() -> dict:
    """The 2-GPU row's recipe options, on a tiny WRN, the digits, 2 epochs of a 64-sample global batch."""
    import yaml

    spec = yaml.safe_load((REPO / "config" / "tables" / "cifar10_multi_gpu.yaml").read_text())
    (row,) = [r for r in spec["rows"] if r["id"] == "wrn_28_10_ricap_2gpu"]
    return {**row["overrides"], **TINY_WRN, "dataset.name": "digits", "train.batch_size": GLOBAL_BATCH,
            "scheduler.epochs": 2, "train.dist.world_size": WORLD, "validation.batch_size": 512}


def _reference_config(ref, overrides: dict):
    """The same row as the reference's README command ran it: per-GPU batch, the same lr."""
    t = overrides
    return reference_config(ref, "cifar/wrn.yaml", {
        "dataset.name": "MNIST",  # the digits' geometry (1 channel, 10 classes)
        "model.wrn.depth": 10, "model.wrn.widening_factor": 1,
        "train.batch_size": GLOBAL_BATCH // WORLD, "train.base_lr": float(t["train.base_lr"]),
        "scheduler.type": t["scheduler.type"], "scheduler.epochs": 2,
        "augmentation.use_random_crop": False, "train.distributed": True})


def _rank(rank: int, run: str, port: int, out: str) -> None:
    from imgclf.engine import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    ref = importlib.import_module("pytorch_image_classification")
    train_py = importlib.import_module("train")
    import torch.distributed as dist

    t = Trainer(run, progress=False)
    rc = _reference_config(ref, _our_overrides())
    torch.manual_seed(0)
    rm = ref.create_model(rc)
    with torch.no_grad():  # our weights := the reference's, on both ranks alike
        for _, rp, _, op in paired_parameters(rm, t.model):
            op.copy_(rp)
        for rb, ob in zip(rm.buffers(), t.model.buffers()):
            ob.copy_(rb)

    batches: dict[int, list] = {}
    inner = t.step

    def recording_step(batch):
        batches.setdefault(t.epoch + 1, []).append((batch.images.clone(), batch.targets.clone()))
        return inner(batch)

    t.step = recording_step
    t.fit()

    # The reference as its train.py builds it: the optimizer, then the model under DDP
    # (apply_data_parallel_wrapper names a GPU; on CPU ranks torch's DDP takes no device_ids),
    # the per-step scheduler, its train() loop.
    optimizer = ref.create_optimizer(rc, rm)
    ddp = nn.parallel.DistributedDataParallel(rm)
    scheduler = ref.create_scheduler(rc, optimizer, steps_per_epoch=len(batches[1]))
    # Our batches carry soft targets (RICAP's area-weighted labels): torch's cross-entropy takes
    # them, and equals the reference's RICAPLoss (sum_k w_k CE(y_k)) on the same mix. Its
    # accuracy meter reads hard labels; it is logging only.
    loss_func = nn.CrossEntropyLoss(reduction="mean")
    train_py.compute_accuracy = lambda *a, **k: (torch.zeros(()), torch.zeros(()))
    train_py.global_step = 0
    writer = train_py.DummyWriter()
    for epoch in sorted(batches):
        train_py.train(epoch, rc, ddp, optimizer, scheduler, loss_func, batches[epoch],
                       logging.getLogger("reference"), writer, writer)
    worst = max(float((op.detach() - rp.detach()).abs().max()) for _, rp, _, op in paired_parameters(rm, t.model))
    stats = max(float((ob - rb).abs().max()) for (n, rb), ob in zip(rm.named_buffers(), t.model.buffers())
                if "running" in n)
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{len(batches[1])} {len(batches[2])} {worst} {stats}")


def test_the_two_gpu_row_trains_like_the_reference_under_ddp(ref, tmp_path):
    import torch.multiprocessing as mp

    cfg = C.build(RECIPES / "cifar" / "wrn.yaml", _our_overrides())
    assert cfg.train.dist.mixer_per_rank and not cfg.train.dist.reshuffle_every_epoch and cfg.augmentation.use_ricap
    run = runs.prepare(cfg, tmp_path / "run", resume=True)
    mp.spawn(_rank, args=(str(run), 29561, str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        steps1, steps2, worst, _ = (tmp_path / f"rank{r}").read_text().split()
        assert int(steps1) == int(steps2) == 1347 // GLOBAL_BATCH
        assert float(worst) < 2e-4, f"rank {r}: weights differ from the reference's by {worst}"
    # BN running statistics of the saved model, rank 0's in both (our last evaluation hands rank 0's
    # to every rank, so rank 1's are not its own any more)
    stats = float((tmp_path / "rank0").read_text().split()[3])
    assert stats < 2e-4, f"BN statistics differ from the reference's by {stats}"


@pytest.mark.parametrize("n_samples", [1347, 1350])
def test_each_rank_sees_the_reference_distributed_samplers_samples_in_every_epoch(n_samples):
    """train.dist.reshuffle_every_epoch false and our sharding of the global batch: rank r's batch
    s of every epoch holds the samples that the reference's DistributedSampler (shuffle on,
    set_epoch never called) and BatchSampler give rank r at step s, from the same permutation."""
    from torch.utils.data import BatchSampler, DistributedSampler

    from imgclf.augment.pipeline import Batch
    from imgclf.data import DeviceLoader

    labels = torch.arange(n_samples)
    ours = DeviceLoader(labels.view(-1, 1, 1, 1), labels, GLOBAL_BATCH, shuffle=True, drop_last=True, seed=0,
                        reshuffle=False)
    perm = ours.order(0)  # our permutation, injected into the reference's sampler
    for rank in range(WORLD):
        sampler = DistributedSampler(range(n_samples), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
        original = torch.randperm
        torch.randperm = lambda n, generator=None, **kw: perm.clone()
        try:
            theirs = list(BatchSampler(sampler, batch_size=GLOBAL_BATCH // WORLD, drop_last=True))
        finally:
            torch.randperm = original
        # the trainer's shard of each augmented global batch
        for epoch in range(3):
            got = [Batch(x, y, y).shard(rank, WORLD).labels.tolist() for _, x, y in ours.batches(epoch)]
            assert got == theirs[:len(got)] and len(got) == len(ours)
            assert len(theirs) - len(got) in (0, 1)  # the sampler pads to a multiple of the ranks
