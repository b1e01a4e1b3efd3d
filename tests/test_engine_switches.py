"""Every training switch a table row (or its recipe) uses, tested by its effect inside the engine.

Each test builds a real ``Trainer`` on the digits (tiny ResNet-PreAct), runs its real epoch loop
and watches what the engine computes: the images fed to the model, the logits, the targets and
loss handed to the loss path, and the gradients and learning rate the optimizer steps with
(an optimizer step pre-hook). A switch that the engine silently ignored fails its test.

Random crop and flip are off unless tested (the digits recipe has no flip), so the fed images
are the normalised source images plus what the tested switch does. Batch 1024 gives one step
per epoch (1,347 training digits, drop_last), batch 256 five.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_run
from imgclf.engine import Trainer

ONE_STEP = {"train.batch_size": 1024, "scheduler.epochs": 1, "augmentation.use_random_crop": False,
            "device": "cpu"}
FIVE_STEPS = {**ONE_STEP, "train.batch_size": 256}


class Spy:
    """Records, per call, what the engine's real step computes."""

    def __init__(self, trainer: Trainer):
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.start = copy.deepcopy(trainer.model)  # the weights before the first step
        model, loss_fn = trainer.step.forward, trainer.step.loss

        def forward(x):
            out = model(x)
            self.inputs.append(x.detach().clone())
            self.outputs.append(out.detach().float().clone())
            return out

        def loss(logits, targets, *args, **kwargs):
            value, pred = loss_fn(logits, targets, *args, **kwargs)
            self.targets.append(targets.detach().clone())
            self.losses.append(value.detach().clone())
            return value, pred

        def pre_step(optimizer, args, kwargs):
            self.grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                               if p.grad is not None})
            self.lrs.append(optimizer.param_groups[0]["lr"])

        trainer.step.forward = forward
        trainer.step.loss = loss
        trainer.optimizer.register_step_pre_hook(pre_step)


def engine(tmp_path, name="run", **overrides) -> tuple[Trainer, Spy]:
    trainer = Trainer(make_run(tmp_path / name, **overrides), progress=False)
    return trainer, Spy(trainer)


def one_epoch(tmp_path, name="run", **overrides) -> tuple[Trainer, Spy]:
    trainer, spy = engine(tmp_path, name, **overrides)
    trainer._train_epoch(None)
    return trainer, spy


def plain_batch(trainer: Trainer, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised source images and labels of ``step`` of epoch 0, without augmentation."""
    _, images, labels = next(iter(trainer.loader.batches(0, start=step)))
    return trainer.eval_transform(images), labels


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n + ".weight": m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def bn_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": p.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for k, p in m.named_parameters()}


# ---------------------------------------------------------------------------- optimizer switches
def test_gradient_clip_bounds_the_global_norm_of_the_stepped_gradient(tmp_path):
    clip = 0.05
    _, free = one_epoch(tmp_path, "free", **FIVE_STEPS)
    _, clipped = one_epoch(tmp_path, "clipped", **FIVE_STEPS, **{"train.gradient_clip": clip})
    assert global_norm(free.grads[0]) > 4 * clip  # so the bound below is the clip's doing
    for grads in clipped.grads:
        assert global_norm(grads) <= clip * (1 + 1e-5)
    # Same weights and batch at step 1: the clipped gradient is the free one scaled onto the ball.
    scale = clip / global_norm(free.grads[0])
    for k, g in free.grads[0].items():
        torch.testing.assert_close(clipped.grads[0][k], g * scale, rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("nesterov", [True, False])
def test_weight_decay_momentum_and_nesterov_give_the_sgd_first_step(tmp_path, nesterov):
    """First step, from the same weights and batch: w1(wd) - w1(0) = -lr * k * wd * w0 with
    k = 1 + momentum under Nesterov (the buffer starts at the gradient), 1 without."""
    wd, lr, mom = 0.05, 0.1, 0.9
    common = {**ONE_STEP, "train.base_lr": lr, "train.momentum": mom, "train.nesterov": nesterov}
    runs = {}
    for decay in (0.0, wd):
        trainer, spy = one_epoch(tmp_path, f"wd{decay}", **common, **{"train.weight_decay": decay})
        runs[decay] = (conv_weights(spy.start), conv_weights(trainer.model))
        assert spy.lrs == [lr]
    w0, w_plain = runs[0.0]
    _, w_decay = runs[wd]
    k = 1 + mom if nesterov else 1.0
    for name in w0:
        torch.testing.assert_close(w_decay[name] - w_plain[name], -lr * k * wd * w0[name], rtol=2e-3, atol=1e-7,
                                   msg=name)


def test_no_weight_decay_on_bn_leaves_bn_weights_undecayed_in_a_real_step(tmp_path):
    wd = 0.05
    after = {}
    for name, extra in {"none": {"train.weight_decay": 0.0},
                        "no_bn": {"train.weight_decay": wd, "train.no_weight_decay_on_bn": True},
                        "all": {"train.weight_decay": wd, "train.no_weight_decay_on_bn": False}}.items():
        trainer, _ = one_epoch(tmp_path, name, **ONE_STEP, **extra)
        after[name] = (bn_params(trainer.model), conv_weights(trainer.model))
    assert after["none"][0]
    for k, v in after["none"][0].items():  # the BN scale and shift moved as without any decay
        assert torch.equal(after["no_bn"][0][k], v), k
        assert not torch.equal(after["all"][0][k], v) or k.endswith("bias"), k
    assert any(not torch.equal(after["no_bn"][1][k], v) for k, v in after["none"][1].items())  # convs decay


def test_lars_moves_each_conv_weight_by_lr_times_its_norm(tmp_path):
    """LARS's trust ratio ||w|| / ||g|| (weight decay 0): the first update of every conv weight
    has norm lr * ||w||, whatever its gradient's size (SGD's would be lr * ||g||)."""
    lr = 0.02
    trainer, spy = one_epoch(tmp_path, **ONE_STEP, **{"train.optimizer": "lars", "train.base_lr": lr,
                                                      "train.weight_decay": 0.0})
    before, after = conv_weights(spy.start), conv_weights(trainer.model)
    ratios = []
    for name, w0 in before.items():
        assert torch.linalg.vector_norm(w0) > 1e-2  # above LARS's threshold
        step = torch.linalg.vector_norm(after[name] - w0) / torch.linalg.vector_norm(w0)
        ratios.append(float(step))
    assert ratios == pytest.approx([lr] * len(ratios), rel=1e-3)
    grad_norms = [float(torch.linalg.vector_norm(spy.grads[0][n])) for n in before]
    assert max(grad_norms) > 3 * min(grad_norms)  # equal steps from unequal gradients


def test_subdivision_steps_with_the_mean_of_the_chunk_gradients(tmp_path):
    """train.subdivision 4 (ghost BN): the model sees four chunks of 64, BN normalises each
    alone, and the optimizer steps with the mean of the four chunks' gradients."""
    trainer, spy = one_epoch(tmp_path, "sub", **FIVE_STEPS, **{"train.subdivision": 4})
    assert [len(x) for x in spy.inputs[:4]] == [64] * 4 and len(spy.inputs) == 20
    model = spy.start
    model.train()
    model.zero_grad()
    for x, t in zip(spy.inputs[:4], spy.targets[:4]):
        (F.cross_entropy(model(x), t) / 4).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(spy.grads[0][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    _, whole = one_epoch(tmp_path, "whole", **FIVE_STEPS)
    assert len(whole.inputs[0]) == 256
    assert not torch.allclose(whole.grads[0]["fc.weight"], spy.grads[0]["fc.weight"], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------- schedules
def test_batch_size_and_epochs_shape_the_loop(tmp_path):
    run = make_run(tmp_path / "run", **{**FIVE_STEPS, "train.batch_size": 128, "scheduler.epochs": 2})
    trainer = Trainer(run, progress=False)
    spy = Spy(trainer)
    trainer.fit()
    assert [len(x) for x in spy.inputs] == [128] * 20  # 1,347 // 128 = 10 steps per epoch, 2 epochs
    assert len(trainer.log_rows) == 2


def test_multistep_decays_the_stepped_lr_at_the_milestone(tmp_path):
    trainer, spy = engine(tmp_path, **{**FIVE_STEPS, "scheduler.epochs": 2, "scheduler.type": "multistep",
                                       "scheduler.milestones": [1], "scheduler.lr_decay": 0.1,
                                       "train.base_lr": 0.1})
    trainer.fit()
    first, second = spy.lrs[:5], spy.lrs[5:]
    assert first[0] == pytest.approx(0.1) and second[-1] == pytest.approx(0.01)
    # Where exactly the decay lands (last step of epoch 1 or first of epoch 2) is the schedule's
    # business (tests/fidelity); the engine must step with it.
    assert sum(lr == pytest.approx(0.1) for lr in spy.lrs) in (4, 5, 6)
    assert all(lr == pytest.approx(0.1) or lr == pytest.approx(0.01) for lr in spy.lrs)


def test_cosine_anneals_the_stepped_lr(tmp_path):
    trainer, spy = engine(tmp_path, **{**FIVE_STEPS, "scheduler.epochs": 2, "scheduler.type": "cosine",
                                       "train.base_lr": 0.2})
    trainer.fit()
    assert spy.lrs[0] == pytest.approx(0.2)
    assert all(b < a for a, b in zip(spy.lrs, spy.lrs[1:]))
    assert spy.lrs[-1] < 0.1 * 0.2


@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_warmup_ramps_the_stepped_lr_up_to_base_lr(tmp_path, kind):
    trainer, spy = engine(tmp_path, **{**FIVE_STEPS, "scheduler.epochs": 2, "scheduler.type": "constant",
                                       "scheduler.warmup.type": kind, "scheduler.warmup.epochs": 1,
                                       "train.base_lr": 0.1})
    trainer.fit()
    warm, after = spy.lrs[:5], spy.lrs[5:]
    assert warm[0] < 0.05
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert after == pytest.approx([0.1] * 5)


# ---------------------------------------------------------------------------- losses and targets
def test_label_smoothing_changes_the_engine_loss_by_epsilon_times_the_smoothing_term(tmp_path):
    """On fixed logits z fed through the engine's real step and loss path: the smoothed loss
    minus the plain one is eps * (CE against the uniform distribution - CE against the label)."""
    eps = 0.1
    spies, z = {}, None
    for name, extra in {"plain": {}, "smooth": {"augmentation.use_label_smoothing": True,
                                              "augmentation.label_smoothing.epsilon": eps}}.items():
        trainer = Trainer(make_run(tmp_path / name, **ONE_STEP, **extra), progress=False)
        if z is None:  # confident logits: mostly right, so smoothing costs a visible amount
            labels = plain_batch(trainer)[1]
            noise = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(0))
            z = (noise + 6 * F.one_hot(labels, 10)).requires_grad_()
        trainer.step.forward = lambda x: z + 0 * x.sum()  # fixed logits, still on the step's graph
        spies[name] = Spy(trainer)
        trainer._train_epoch(None)
    plain, smooth = spies["plain"], spies["smooth"]
    logp = z.detach().double().log_softmax(1)
    labels = plain.targets[0].argmax(1)
    ce = -logp.gather(1, labels[:, None]).mean()
    uniform = -logp.mean(1).mean()  # the cross-entropy against the uniform distribution
    assert float(plain.losses[0]) == pytest.approx(float(ce), rel=1e-6)
    diff = float(smooth.losses[0]) - float(plain.losses[0])
    assert diff == pytest.approx(float(eps * (uniform - ce)), rel=1e-4)
    assert diff > 0.3


def _soft_ce(logits, targets):
    return float(-(targets * logits.log_softmax(1)).sum(1).mean())


@pytest.mark.parametrize("mixer", ["mixup", "cutmix", "ricap"])
def test_batch_mixers_alter_the_fed_images_and_the_loss_targets(tmp_path, mixer):
    trainer, spy = one_epoch(tmp_path, **ONE_STEP, **{f"augmentation.use_{mixer}": True})
    x0, labels = plain_batch(trainer)
    x, t = spy.inputs[0], spy.targets[0]
    assert x.shape == x0.shape
    changed = (x != x0).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # the engine fed mixed images
    assert torch.allclose(t.sum(1), torch.ones(len(t))) and (t >= 0).all()
    mixed_rows = (t > 1e-6).sum(1) >= 2
    assert mixed_rows.float().mean() > 0.5  # and mixed targets
    # The loss is the soft cross-entropy against these targets, not against the hard labels.
    assert float(spy.losses[0]) == pytest.approx(_soft_ce(spy.outputs[0], t), rel=1e-5)
    assert abs(float(spy.losses[0]) - float(F.cross_entropy(spy.outputs[0], labels))) > 1e-4 * float(spy.losses[0])
    onehot = F.one_hot(labels, t.shape[1]).float()
    if mixer == "mixup":
        # x = lam * x0 + (1 - lam) * x0[j], t = lam * onehot(y) + (1 - lam) * onehot(y[j])
        row = int(mixed_rows.nonzero()[0])
        lam = float(t[row, labels[row]])
        assert 0 < lam < 1
        rest = (x - lam * x0) / (1 - lam)
        dist = torch.cdist(rest.flatten(1), x0.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
        j = dist.argmin(1)
        assert dist.min(1).values.max() < 1e-3 * x0.flatten(1).norm(dim=1).mean() / (1 - lam)
        torch.testing.assert_close(t, lam * onehot + (1 - lam) * onehot[j], rtol=1e-5, atol=1e-6)
    elif mixer == "cutmix":
        # A patch, not a blend: every fed pixel is the same pixel of some image of the batch.
        found = (x.unsqueeze(1) == x0.unsqueeze(0)).any(1)
        assert found.all()
        # One box per batch: the target weights of the rows with distinct labels are one pair.
        assert len({tuple(sorted(round(v, 5) for v in row[row > 1e-6].tolist())) for row in t[mixed_rows]}) == 1
    else:
        # RICAP: four patches split at one (w, h) per batch, each a crop of some batch image,
        # the target weights their areas.
        side = x.shape[-1]

        def patched(w, h, i):
            for top, left, ph, pw in ((0, 0, h, w), (0, w, h, side - w), (h, 0, side - h, w),
                                      (h, w, side - h, side - w)):
                if ph and pw:
                    patch = x[i, :, top:top + ph, left:left + pw]
                    crops = x0.unfold(2, ph, 1).unfold(3, pw, 1)  # (N, C, oy, ox, ph, pw)
                    if not (crops == patch[:, None, None]).flatten(4).all(4).all(1).any():
                        return False
            return True

        cuts = [(w, h) for w in range(side + 1) for h in range(side + 1)
                if all(patched(w, h, i) for i in range(16))]
        assert cuts
        four = [row[row > 1e-6] for row in t if (row > 1e-6).sum() == 4]
        if four:  # a row with four distinct labels: its weights are the four areas
            w, h = cuts[0]
            areas = sorted(a / side ** 2 for a in (w * h, (side - w) * h, w * (side - h), (side - w) * (side - h)))
            assert sorted(four[0].tolist()) == pytest.approx(areas, abs=1e-6)


def test_dual_cutout_feeds_two_views_and_adds_alpha_times_their_logit_gap(tmp_path):
    alpha = 0.1
    over = {**ONE_STEP, "augmentation.use_dual_cutout": True, "augmentation.cutout.mask_size": 4,
            "augmentation.cutout.dual_cutout_alpha": alpha}
    trainer, spy = one_epoch(tmp_path, **over)
    x0, labels = plain_batch(trainer)
    n = len(x0)
    x, z = torch.cat(spy.inputs), torch.cat(spy.outputs)
    assert len(x) == 2 * n and len(z) == 2 * n  # two views of every image (in one or two passes)
    v1, v2 = x[:n], x[n:]
    assert ((v1 != x0).flatten(1).any(1) & (v2 != x0).flatten(1).any(1)).float().mean() > 0.9
    assert (v1 != v2).flatten(1).any(1).float().mean() > 0.9  # independent masks
    z1, z2 = z[:n], z[n:]
    t = spy.targets[0]
    expect = 0.5 * (_soft_ce(z1, t) + _soft_ce(z2, t)) + alpha * float(F.mse_loss(z1, z2))
    assert float(spy.losses[0]) == pytest.approx(expect, rel=1e-5)
    assert alpha * float(F.mse_loss(z1, z2)) > 1e-4  # the consistency term is there to be seen


@pytest.mark.parametrize("mask_size", [4, 6])
def test_cutout_zeroes_one_square_of_mask_size_in_the_fed_images(tmp_path, mask_size):
    trainer, spy = one_epoch(tmp_path, **ONE_STEP, **{"augmentation.use_cutout": True,
                                                      "augmentation.cutout.mask_size": mask_size})
    x0, _ = plain_batch(trainer)
    x = spy.inputs[0]
    changed = (x != x0).any(1)  # (N, H, W)
    assert changed.flatten(1).any(1).float().mean() > 0.8
    assert (x.permute(1, 0, 2, 3)[:, changed] == 0).all()  # the fill: 0 = the mean after normalising
    rows, cols = changed.any(2), changed.any(1)
    height, width = rows.sum(1), cols.sum(1)
    assert height.max() <= mask_size and width.max() <= mask_size
    assert (height == mask_size).any() and (width == mask_size).any()  # squares wholly inside


def test_random_erasing_erases_one_rectangle_in_some_fed_images(tmp_path):
    trainer, spy = one_epoch(tmp_path, **ONE_STEP, **{"augmentation.use_random_erasing": True})
    x0, _ = plain_batch(trainer)
    x = spy.inputs[0]
    changed = (x != x0).any(1)
    hit = changed.flatten(1).any(1)
    assert 0.3 < hit.float().mean() < 0.7  # prob 0.5
    side = x.shape[-1]
    for m in changed[hit]:
        r, c = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = (r.max() - r.min() + 1) * (c.max() - c.min() + 1)
        # area_ratio_range [0.02, 0.4] of 64 pixels, plus the rounding of each side on an 8x8 image
        assert 1 <= box <= 0.4 * side * side + side, box
        assert m.sum() >= 0.9 * box  # the erased pixels fill their bounding box: one rectangle


@pytest.mark.parametrize("crop", [True, False])
def test_random_crop_shifts_the_fed_images_by_at_most_the_padding(tmp_path, crop):
    trainer, spy = one_epoch(tmp_path, **{**ONE_STEP, "augmentation.use_random_crop": crop})
    x0, _ = plain_batch(trainer)
    x = spy.inputs[0]
    if not crop:
        assert torch.equal(x, x0)
        return
    pad = trainer.cfg.augmentation.random_crop.padding
    fill = float(trainer.eval_transform(torch.zeros(1, 1, 1, 1, dtype=torch.uint8)).flatten()[0])
    padded = F.pad(x0, (pad,) * 4, value=fill)
    h = x.shape[-1]
    offsets = []
    for i in range(len(x)):
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(padded[i, :, dy:dy + h, dx:dx + h], x[i])]
        assert match, i
        offsets.append(match[0])
    assert len(set(offsets)) == (2 * pad + 1) ** 2  # all 9 offsets occur in 1,024 images


def test_horizontal_flip_mirrors_about_half_of_the_fed_images(tmp_path):
    trainer, spy = one_epoch(tmp_path, **ONE_STEP, **{"augmentation.use_random_horizontal_flip": True})
    x0, _ = plain_batch(trainer)
    x = spy.inputs[0]
    same = (x == x0).flatten(1).all(1)
    mirrored = (x == x0.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < (mirrored & ~same).float().mean() < 0.6


# ---------------------------------------------------------------------------- model-level randomness
def test_dropout_and_shake_shake_are_random_in_training_only(tmp_path):
    for over in ({"model.name": "wrn", "model.wrn.depth": 10, "model.wrn.widening_factor": 1,
                  "model.wrn.initial_channels": 8, "model.wrn.drop_rate": 0.3},
                 {"model.name": "shake_shake", "model.shake_shake.depth": 8, "model.shake_shake.initial_channels": 8}):
        trainer, _ = engine(tmp_path, over["model.name"], **ONE_STEP, **over)
        x0, _ = plain_batch(trainer)
        model = trainer.model
        model.train()
        torch.manual_seed(0)
        a = model(x0[:64])
        torch.manual_seed(1)
        b = model(x0[:64])
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model(x0[:64]), model(x0[:64]))


# ---------------------------------------------------------------------------- compile, SyncBN + DDP
def test_compile_really_compiles_the_step_and_matches_eager(tmp_path, monkeypatch):
    """train.compile wraps the stepped model in torch.compile; its first step equals eager's.
    (The 'eager' backend: dynamo captures the graph, no C++ build, seconds on CPU.)"""
    calls = []
    real = torch.compile

    def cheap_compile(model, **kwargs):
        calls.append(model)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", cheap_compile)
    import torch._dynamo as dynamo

    dynamo.reset()
    counters = dynamo.utils.counters
    counters.clear()
    compiled, spy_c = one_epoch(tmp_path, "compiled", **ONE_STEP, **{"train.compile": True})
    assert len(calls) == 1 and calls[0] is compiled.ddp_model
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the forward
    eager, spy_e = one_epoch(tmp_path, "eager", **ONE_STEP)
    torch.testing.assert_close(spy_c.outputs[0], spy_e.outputs[0], rtol=1e-5, atol=1e-5)
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_sync_bn_converts_every_batchnorm_and_refuses_cpu_ranks_clearly(tmp_path, monkeypatch):
    """train.dist.use_sync_bn over several ranks turns every BatchNorm into a SyncBatchNorm
    (same parameters and buffers). torch's DDP cannot run SyncBatchNorm on CPU ranks: a Trainer
    of 2 CPU ranks with the switch on stops with a one-line error naming the switch, before DDP."""
    from imgclf.engine import assembly, trainer as engine_trainer
    from imgclf.models import build as build_model
    from imgclf import config as C
    from conftest import DIGITS, TINY

    model = build_model(C.build(DIGITS, TINY), in_channels=1, n_classes=10)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    synced = assembly.sync_batchnorm(copy.deepcopy(model), torch.device("cuda"))
    assert bns and all(isinstance(dict(synced.named_modules())[n], nn.SyncBatchNorm) for n in bns)
    assert synced.state_dict().keys() == model.state_dict().keys()
    two_ranks = engine_trainer.distenv.DistEnv(rank=0, world_size=2, local_world_size=2)
    monkeypatch.setattr(engine_trainer.distenv, "current", lambda device: (two_ranks, torch.device("cpu")))
    monkeypatch.setattr(engine_trainer.distenv, "init_process_group", lambda *args: None)  # 2 ranks, no group needed
    monkeypatch.setattr(engine_trainer.dist, "new_group", lambda **kwargs: None)  # nor the ranks' control group
    with pytest.raises(ValueError, match=r"^train.dist.use_sync_bn: SyncBatchNorm needs GPU ranks[^\n]*$"):
        Trainer(make_run(tmp_path / "run", **ONE_STEP, **{"train.dist.use_sync_bn": True}), progress=False)
