"""Augmentations: our batched draws have the distributions of the reference's per-sample
transforms and collators, for every configuration a table row uses.

Each comparison takes N = 10,000 draws from each side (seeded, so the test is deterministic) and
applies a two-sample test: chi-square homogeneity for discrete quantities (offsets, sizes, corners,
boundaries; categories with few counts pooled), Kolmogorov-Smirnov for continuous ones (lambda, fill).
Tolerance: the test fails when p < 1e-3, i.e. a real difference of about 1.5 percentage points in
a 50 % rate, or a shift of a few percent of a box size, is caught; equal distributions fail one
comparison in a thousand, and the seeds are fixed.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import stats

from imgclf.augment import basic
from imgclf.augment.cutmix import cutmix
from imgclf.augment.cutout import cutout
from imgclf.augment.mixup import mixup
from imgclf.augment.random_erasing import random_erasing
from imgclf.augment.ricap import ricap
from oracle import augmentation_config

N = 10_000
P_MIN = 1e-3


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor ops: threads only add contention (5-20x slower on a busy 2-core CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_discrete(a, b, what: str) -> None:
    """Chi-square homogeneity of two samples of integer-coded categories (rare ones pooled)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    cats, counts = np.unique(np.concatenate([a, b]), return_counts=True)
    keep = cats[counts >= 20]
    table = [[np.isin(x, keep, invert=True).sum(), *[(x == c).sum() for c in keep]] for x in (a, b)]
    table = np.array(table)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        assert np.array_equal(np.unique(a), np.unique(b)), what
        return
    p = stats.chi2_contingency(table)[1]
    assert p > P_MIN, f"{what}: chi-square p = {p:.2g}; ours {np.bincount(a - a.min())[:12]}..., " \
                      f"reference {np.bincount(b - b.min())[:12]}..."


def same_continuous(a, b, what: str) -> None:
    p = stats.ks_2samp(np.asarray(a), np.asarray(b)).pvalue
    assert p > P_MIN, f"{what}: Kolmogorov-Smirnov p = {p:.2g} (means {np.mean(a):.4f} vs {np.mean(b):.4f})"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ref_cfg(ref, size, channels, **aug):
    cfg = augmentation_config(ref, **aug)
    cfg.dataset.image_size, cfg.dataset.n_channels = size, channels
    return cfg


def _boxes(mask: np.ndarray):
    """(y0, y1, x0, x1) of a boolean (N, H, W) mask's rectangles; (0, 0, 0, 0) where empty."""
    rows, cols = mask.any(2), mask.any(1)
    hit = rows.any(1)
    y0 = np.where(hit, rows.argmax(1), 0)
    y1 = np.where(hit, rows.shape[1] - rows[:, ::-1].argmax(1), 0)
    x0 = np.where(hit, cols.argmax(1), 0)
    x1 = np.where(hit, cols.shape[1] - cols[:, ::-1].argmax(1), 0)
    return y0, y1, x0, x1


# --------------------------------------------------------------------------- crop and flip
@pytest.mark.parametrize("size", [32, 28])  # CIFAR, the MNIST family; padding 4 in every row
def test_crop_offsets_and_flip_rate(ref, size):
    from pytorch_image_classification.transforms import RandomCrop, RandomHorizontalFlip

    cfg = _ref_cfg(ref, size, 3)
    crop, flip = RandomCrop(cfg), RandomHorizontalFlip(cfg)
    r, c = np.meshgrid(np.arange(size) + 1, np.arange(size) + 1, indexing="ij")
    coded = np.stack([r, c, np.zeros_like(r)], axis=2).astype(np.uint8)  # 1-based row, column
    image = PIL.Image.fromarray(coded)
    torch.manual_seed(0)
    theirs = np.stack([np.asarray(flip(crop(image))) for _ in range(N)]).astype(np.int64)  # (N, H, W, 3)

    x = torch.from_numpy(coded).permute(2, 0, 1)[None].expand(N, -1, -1, -1).float()
    g = _gen(0)
    ours = basic.horizontal_flip(basic.random_crop(x, padding=4, generator=g), prob=0.5, generator=g)
    ours = ours.permute(0, 2, 3, 1).round().long().numpy()

    def decode(batch):
        mid = size // 2  # always inside the image for |offset| <= 4
        flipped = batch[:, mid, mid + 1, 1] < batch[:, mid, mid, 1]
        col = np.where(flipped, size - 1 - mid, mid)
        oy = batch[:, mid, mid, 0] - 1 - mid + 4
        ox = batch[:, mid, mid, 1] - 1 - col + 4
        return oy, ox, flipped

    (oy_a, ox_a, f_a), (oy_b, ox_b, f_b) = decode(ours), decode(theirs)
    assert oy_b.min() == 0 and oy_b.max() == 8 and ox_a.min() == 0 and ox_a.max() == 8
    same_discrete(oy_a * 9 + ox_a, oy_b * 9 + ox_b, f"crop offsets ({size}px)")
    same_discrete(f_a.astype(int), f_b.astype(int), "flip rate")
    assert abs(f_a.mean() - 0.5) < 0.02


# --------------------------------------------------------------------------- cutout
@pytest.mark.parametrize(("size", "mask"), [(32, 16), (28, 6), (28, 8), (28, 10), (28, 12), (28, 14), (28, 16)])
def test_cutout_centre_and_area(ref, size, mask):
    from pytorch_image_classification.transforms import Cutout

    transform = Cutout(_ref_cfg(ref, size, 1, **{"cutout.mask_size": mask}))
    np.random.seed(0)
    ones = np.ones((size, size, 1), dtype=np.float32)
    theirs = np.stack([transform(ones)[:, :, 0] == 0 for _ in range(N)])
    ours = cutout(torch.ones(N, 1, size, size), mask_size=mask, prob=1.0, cut_inside=False, mask_color=0.0,
                  generator=_gen(1))[:, 0].numpy() == 0
    ya, yb = _boxes(ours), _boxes(theirs)
    for name, k in (("rows", 0), ("columns", 2)):
        same_discrete(ya[k] * 100 + ya[k + 1], yb[k] * 100 + yb[k + 1], f"cutout {mask} in {size}px: clipped {name}")
    area_a, area_b = ours.sum((1, 2)), theirs.sum((1, 2))
    same_discrete(area_a, area_b, f"cutout {mask} in {size}px: area")
    assert area_b.max() == area_a.max() == mask * mask


# --------------------------------------------------------------------------- random erasing
@pytest.mark.parametrize("size", [32, 28])
def test_random_erasing_area_aspect_position_and_fill(ref, size):
    from pytorch_image_classification.transforms import RandomErasing

    transform = RandomErasing(_ref_cfg(ref, size, 3))
    np.random.seed(0)
    zeros = np.zeros((size, size, 3), dtype=np.float32)
    theirs = np.stack([transform(zeros) for _ in range(N)]).transpose(0, 3, 1, 2)  # (N, 3, H, W)
    ours = random_erasing(torch.zeros(N, 3, size, size), prob=0.5, area_ratio_range=[0.02, 0.4],
                          min_aspect_ratio=0.3, max_attempt=20, generator=_gen(2)).numpy()
    results = []
    for out in (ours, theirs):
        erased = out[:, 0] != 0
        # one value per rectangle, the same in every channel
        assert np.all((out != 0) == erased[:, None])
        y0, y1, x0, x1 = _boxes(erased)
        assert np.array_equal(erased.sum((1, 2)), (y1 - y0) * (x1 - x0))  # a rectangle
        applied = erased.any((1, 2))
        fills = np.array([out[i, :, y0[i], x0[i]] for i in np.flatnonzero(applied)])
        assert np.all(fills == fills[:, :1])
        h, w = (y1 - y0)[applied], (x1 - x0)[applied]
        assert np.all(y1[applied] < size) and np.all(x1[applied] < size)  # never the last row/column
        results.append((applied, h, w, y0[applied], x0[applied], fills[:, 0]))
    (ap_a, h_a, w_a, y_a, x_a, f_a), (ap_b, h_b, w_b, y_b, x_b, f_b) = results
    where = f"random erasing ({size}px)"
    same_discrete(ap_a.astype(int), ap_b.astype(int), f"{where}: applied rate")
    same_discrete(h_a, h_b, f"{where}: height")
    same_discrete(w_a, w_b, f"{where}: width")
    same_discrete(np.digitize(h_a * w_a, np.quantile(h_b * w_b, np.linspace(0.1, 0.9, 9))),
                  np.digitize(h_b * w_b, np.quantile(h_b * w_b, np.linspace(0.1, 0.9, 9))), f"{where}: area")
    same_discrete(np.round(np.log(h_a / w_a) * 4).astype(int), np.round(np.log(h_b / w_b) * 4).astype(int),
                  f"{where}: aspect")
    same_discrete(y_a, y_b, f"{where}: top")
    same_discrete(x_a, x_b, f"{where}: left")
    same_continuous(f_a, f_b, f"{where}: fill")


# --------------------------------------------------------------------------- mixers
def _our_mix_draws(fn, n_draws, batch, **kw):
    """Per draw: the mixed images and soft targets of a batch whose sample i is constant i and has
    label i (one-hot over ``batch`` classes)."""
    x = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 32, 32).contiguous()
    y = torch.eye(batch)
    g = _gen(3)
    return [fn(x, y, generator=g, **kw) for _ in range(n_draws)]


@pytest.mark.parametrize("alpha", [1.0, 0.5])  # the rows' mixup alphas
def test_mixup_lambda(ref, alpha):
    from pytorch_image_classification.collators.mixup import mixup as ref_mixup

    np.random.seed(0)
    torch.manual_seed(0)
    data, labels = torch.zeros(8, 1, 2, 2), torch.arange(8)
    theirs = np.array([ref_mixup((data, labels), alpha)[1][2] for _ in range(N)])
    ours = np.array([float(ym.diagonal().min()) for _, ym in _our_mix_draws(mixup, N, 8, alpha=alpha)])
    same_continuous(ours, theirs, f"mixup lambda (alpha {alpha})")
    assert stats.kstest(ours, stats.beta(alpha, alpha).cdf).pvalue > P_MIN


def test_cutmix_boxes_and_lambda(ref):
    """No table row uses CutMix. Boxes: the same distribution of size and position. Label weight:
    ours is 1 - (pasted area), the pixels' own share (the CutMix authors' code); the reference keeps
    the drawn lambda, which differs from its box's share whenever the box is clipped or rounded."""
    from pytorch_image_classification.collators.cutmix import cutmix as ref_cutmix

    np.random.seed(0)
    torch.manual_seed(0)
    size, batch = 32, 8
    base = torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, size, size)
    labels = torch.arange(batch)
    boxes_b, lam_b, share_b = [], [], []
    for _ in range(N):
        data, (_, _, lam) = ref_cutmix((base.clone(), labels), 1.0)
        box = (data != base).any(0)[0].numpy()
        boxes_b.append(box)
        lam_b.append(lam)
    boxes_a, lam_a = [], []
    for xm, ym in _our_mix_draws(cutmix, N, batch, alpha=1.0):
        box = (xm != base).any(0)[0].numpy()
        boxes_a.append(box)
        lam_a.append(float(ym.diagonal().min()))
    a, b = np.stack(boxes_a), np.stack(boxes_b)
    ya, yb = _boxes(a), _boxes(b)
    same_discrete(ya[1] - ya[0], yb[1] - yb[0], "cutmix box height")
    same_discrete(ya[3] - ya[2], yb[3] - yb[2], "cutmix box width")
    same_discrete(ya[0] + ya[1], yb[0] + yb[1], "cutmix box centre (rows)")
    share_a = a.mean((1, 2))
    np.testing.assert_allclose(lam_a, 1 - share_a, atol=1e-6)  # ours: the label weight is the pixel share
    share_b = b.mean((1, 2))
    assert np.mean(np.abs(np.array(lam_b) - (1 - share_b)) > 0.01) > 0.2  # theirs: often not
    same_continuous(np.array(lam_b), stats.beta(1, 1).rvs(N, random_state=0), "reference cutmix lambda ~ Beta")


def _first_switch(lines: torch.Tensor, size: int) -> np.ndarray:
    """lines: (draws, batch, L, 3) source codes along a line; per draw the first position where any
    sample's line switches to another source crop; 0 where none does (w = 0 and w = W look alike)."""
    change = (lines != lines[:, :, :1]).any(-1)  # (draws, batch, L)
    first = torch.where(change.any(2), change.float().argmax(2), torch.full(change.shape[:2], size))
    return (first.min(1).values % size).numpy()


def test_ricap_boundaries_offsets_and_weights(ref, monkeypatch):
    """Boundaries, crop offsets and label weights; the offsets are one joint draw per region for the
    whole batch (augmentation.ricap.offsets per_batch, as the reference's collator)."""
    from pytorch_image_classification.collators.ricap import ricap as ref_ricap

    monkeypatch.setattr(np, "int", int, raising=False)  # the reference's np.int, gone in numpy >= 1.24
    draws = []  # the reference's randint calls: x0, y0 of each region in turn
    randint = np.random.randint
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: draws.append(randint(*a, **k)) or draws[-1])
    size, batch, beta = 32, 8, 0.3
    np.random.seed(0)
    torch.manual_seed(0)
    theirs, their_x0 = [], []
    for _ in range(N):
        draws.clear()
        _, (_, weights) = ref_ricap((torch.zeros(batch, 1, size, size), torch.arange(batch)), beta)
        w0 = round(size * (weights[0] + weights[2]))
        h0 = round(size * (weights[0] + weights[1]))
        theirs.append((w0 % size, h0 % size))
        if w0 % size and h0 % size:  # the top-left region is there and not the whole image
            their_x0.append(draws[0])
    # our images carry (source sample, row, column): within one patched region, (sample, row - r,
    # column - c) is constant
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.stack([torch.arange(batch).float().view(-1, 1, 1).expand(-1, size, size),
                     r.float().expand(batch, -1, -1), c.float().expand(batch, -1, -1)], dim=1)
    y = torch.eye(batch)
    g = _gen(4)
    top_rows, left_cols, corners = [], [], []
    for k in range(N):
        xm, ym = ricap(x, y, beta=beta, generator=g)
        top_rows.append(xm[:, :, 0, :])
        left_cols.append(xm[:, :, :, 0])
        corners.append(xm[0, 2, 0, 0])  # the top-left region's crop offset x0 (when the region is there)
        # (row - r, column - c) is a region's crop offset less its position: equal across the batch
        shift = xm[:, 1:] - torch.stack([r, c]).float()
        assert torch.equal(shift, shift[:1].expand_as(shift)), f"draw {k}: crop offsets differ within the batch"
        if k < 200:  # weights: every source image's share of the pixels
            share = torch.zeros(batch, batch).scatter_add_(1, xm[:, 0].flatten(1).long(),
                                                           torch.full((batch, size * size), 1 / size**2))
            torch.testing.assert_close(ym, share)
    pos = torch.arange(size).float()
    top = torch.stack(top_rows) - torch.stack([torch.zeros(size), torch.zeros(size), pos])[None, None]
    left = torch.stack(left_cols) - torch.stack([torch.zeros(size), pos, torch.zeros(size)])[None, None]
    w = _first_switch(top.transpose(2, 3), size)
    h = _first_switch(left.transpose(2, 3), size)
    theirs = np.array(theirs)
    same_discrete(w, theirs[:, 0], "ricap boundary w (0 and W merged)")
    same_discrete(h, theirs[:, 1], "ricap boundary h (0 and H merged)")
    ours_x0 = torch.stack(corners).long().numpy()[(w > 0) & (h > 0)]
    same_discrete(ours_x0, np.array(their_x0), "ricap top-left crop offset x0")


def test_ricap_per_sample_offsets_are_the_named_alternative():
    """augmentation.ricap.offsets per_sample: every sample draws its own crop offsets (same
    per-sample distribution); the table rows use per_batch."""
    size, batch = 32, 64
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.stack([torch.zeros(batch, size, size), r.float().expand(batch, -1, -1),
                     c.float().expand(batch, -1, -1)], dim=1)
    y = torch.eye(batch)
    spread = []
    for k in range(50):
        xm, _ = ricap(x, y, beta=0.3, generator=_gen(k), offsets="per_sample")
        spread.append(int((xm[:, 2, 0, 0] - c[0, 0]).unique().numel()))
    assert max(spread) > 1  # some batch has distinct offsets in the top-left region
    with pytest.raises(ValueError, match="augmentation.ricap.offsets"):
        ricap(x, y, beta=0.3, generator=_gen(0), offsets="per_pixel")


# --------------------------------------------------------------------------- multi-GPU rows
def _multi_gpu_rows():
    from imgclf.tables import spec as S
    from oracle import RECIPES, REPO

    return S.load(REPO / "config" / "tables" / "cifar10_multi_gpu.yaml", RECIPES).rows


def test_reference_sampler_keeps_one_order_for_every_epoch(ref):
    """The reference's DistributedSampler is never given set_epoch, so every epoch repeats epoch 0's
    order; the multi-GPU rows reproduce that (train.dist.reshuffle_every_epoch false), the others don't."""
    from oracle import REFERENCE_DIR

    assert "set_epoch" not in (REFERENCE_DIR / "train.py").read_text()
    assert "DistributedSampler(\n                train_dataset)" in (
        REFERENCE_DIR / "pytorch_image_classification" / "datasets" / "dataloader.py").read_text()
    sampler = torch.utils.data.distributed.DistributedSampler(range(64), num_replicas=2, rank=0)
    assert list(sampler) == list(sampler)

    from imgclf.data.loader import DeviceLoader

    data = torch.arange(64)
    fixed = DeviceLoader(data, data, 8, shuffle=True, drop_last=True, seed=3, reshuffle=False)
    moving = DeviceLoader(data, data, 8, shuffle=True, drop_last=True, seed=3)
    assert all(torch.equal(fixed.order(e), fixed.order(0)) for e in range(1, 5))
    assert torch.equal(fixed.order(0), moving.order(0)) and not torch.equal(moving.order(1), moving.order(0))
    for row in _multi_gpu_rows():
        multi = row.config.train.distributed
        assert row.config.train.dist.reshuffle_every_epoch is not multi, row.id
        assert row.config.train.dist.mixer_per_rank is multi, row.id


def test_per_rank_ricap_mixes_each_shard_alone_with_the_same_draws():
    """train.dist.mixer_per_rank: each rank's RICAP takes its patches from its own samples only, and
    every rank draws the same boundary, offsets and (local) permutations, as the reference's
    per-process collators seeded alike."""
    from imgclf.augment.pipeline import TrainTransform
    from imgclf.config import AugmentationConfig

    aug = AugmentationConfig(use_random_crop=False, use_ricap=True)
    n, world, k = 32, 4, 32
    transform = TrainTransform(aug, [0.5], [0.25], k, 8, torch.device("cpu"))
    images = torch.randint(0, 255, (n, 1, 8, 8), dtype=torch.uint8, generator=_gen(5))
    labels = torch.randperm(n, generator=_gen(6))  # distinct labels
    local = []
    for rank in range(world):
        batch = transform(images, labels, _gen(7), mix_shard=(rank, world))
        own = labels[rank::world]
        assert len(batch.targets) == n // world
        assert torch.all(batch.targets[:, own].sum(1) > 0.999)  # no weight on another rank's samples
        local.append(batch.targets[:, own])  # in the shard's own sample order
    assert all(torch.equal(t, local[0]) for t in local[1:])  # the same draws on every rank
    whole = transform(images, labels, _gen(7))
    assert not any(torch.equal(whole.targets[r::world][:, labels[r::world]], local[r]) for r in range(world))


def _per_rank_draws(rank: int, run: str, port: int, out: str) -> None:
    """One gloo rank: the Trainer's augmented batch of epoch 0, step 0 for a global batch of one
    position-coded image repeated, so equal outputs mean equal crop, flip and Cutout draws."""
    import os

    import torch.distributed as dist

    from imgclf.engine import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(run, progress=False)
    try:
        batch = trainer.batches.augment(0, 0, _probe_images(), torch.arange(16) % 10)
        torch.save(batch.images, os.path.join(out, f"rank{rank}.pt"))
        t = trainer.train_transform
        torch.save((t.mean, t.std), os.path.join(out, "normalization.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:  # other test runs on this machine hold fixed ports
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _probe_images(n: int = 16) -> torch.Tensor:
    return (torch.arange(64, dtype=torch.uint8) * 3 + 1).view(1, 1, 8, 8).expand(n, -1, -1, -1).contiguous()


@pytest.mark.parametrize("per_rank", [True, False])
def test_multi_gpu_ranks_draw_the_same_augmentation_for_the_same_shard_position(tmp_path, per_rank):
    """train.dist.augment_per_rank (the multi-GPU rows): under 2-rank DDP every rank draws the same
    crop, flip and Cutout for the same position in its shard, as the reference's identically seeded
    DataLoader workers did, and each rank's batch is what one process draws for a batch of the
    shard's size. Off (the default), the global batch is augmented once and sharded."""
    import torch.multiprocessing as mp

    from imgclf import config as C, runs
    from imgclf.augment.pipeline import TrainTransform
    from imgclf.data import derive_seed
    from oracle import RECIPES

    for row in _multi_gpu_rows():  # the rows that ran on several GPUs set it
        assert row.config.train.dist.augment_per_rank is row.config.train.distributed, row.id
    options = {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8, "train.batch_size": 16,
               "scheduler.epochs": 1, "augmentation.use_random_crop": True, "augmentation.random_crop.padding": 2,
               "augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4, "augmentation.cutout.prob": 0.5,
               "augmentation.use_ricap": True, "train.dist.mixer_per_rank": True,
               "train.dist.augment_per_rank": per_rank}
    cfg = C.build(RECIPES / "digits" / "resnet_preact.yaml", options)
    run = runs.prepare(cfg, tmp_path / "run", resume=True)
    mp.spawn(_per_rank_draws, args=(str(run), _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0.shape == rank1.shape == (8, 1, 8, 8)
    if not per_rank:
        assert not torch.equal(rank0, rank1)
        return
    assert torch.equal(rank0, rank1)
    # what one process draws for a batch of the shard's size from the step's generator
    mean, std = torch.load(tmp_path / "normalization.pt", weights_only=True)
    one = TrainTransform(cfg.augmentation, mean.tolist(), std.tolist(), 10, 8, torch.device("cpu"))
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, 0, 0))
    expected = one.per_batch(one.per_sample(_probe_images(8), gen), torch.arange(8) % 10, gen).images
    assert torch.equal(rank0, expected)
