"""imgclf.optim: LARS against a hand computation, weight-decay groups, LR curves at their landmarks."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from imgclf import config
from imgclf.optim import (
    LARS,
    build_optimizer,
    build_scheduler,
    decayed_parameter_names,
    lr_factor,
    param_groups,
)


@pytest.fixture(autouse=True)
def one_thread():
    # the tensors here are tiny: intra-op threads only add contention on a shared CI machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg_with(**overrides):
    """A validated config from ``KEY=VALUE`` pairs written with ``__`` for dots."""
    return config.build(None, {k.replace("__", "."): v for k, v in overrides.items()})


# --------------------------------------------------------------------------- LARS
def test_lars_two_steps_match_hand_computation():
    lin = nn.Linear(2, 2)  # two parameter tensors, both decayed (no_weight_decay_on_bn spares BN only)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
        lin.bias.copy_(torch.tensor([0.003, -0.004]))  # ||b|| = 0.005 < threshold 0.01
    cfg = cfg_with(train__optimizer="lars", train__base_lr=0.02, train__momentum=0.9,
                   train__weight_decay=0.1, train__no_weight_decay_on_bn=True)
    opt = build_optimizer(cfg, lin)
    assert isinstance(opt, LARS)
    lr, m, wd, eps = 0.02, 0.9, 0.1, cfg.optim.lars.eps

    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    gw, gb = torch.tensor([[0.3, 0.4], [0.0, 0.0]]), torch.tensor([0.1, 0.1])  # ||gw|| = 0.5
    lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
    opt.step()

    # weight: local lr = 5 / (0.5 + 0.1 * 5 + eps) ~= 5, decay added before scaling
    local_w = 5.0 / (0.5 + wd * 5.0 + eps)
    v_w = local_w * (gw + wd * w0)
    w1 = w0 - lr * v_w
    # bias: norm under the threshold -> local lr 1; decayed like the weight
    v_b = gb + wd * b0
    b1 = b0 - lr * v_b
    torch.testing.assert_close(lin.weight.detach(), w1)
    torch.testing.assert_close(lin.bias.detach(), b1)
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[2.94, -0.04], [0.0, 3.96]]))
    torch.testing.assert_close(lin.weight.grad, gw)  # the gradient itself is left untouched

    # second step: heavy-ball momentum on the locally scaled gradient (constant lr: lr in or out of the buffer agree)
    gw2, gb2 = torch.tensor([[0.0, 0.0], [0.6, 0.8]]), torch.tensor([-0.2, 0.05])
    lin.weight.grad, lin.bias.grad = gw2.clone(), gb2.clone()
    opt.step()
    local_w2 = w1.norm() / (gw2.norm() + wd * w1.norm() + eps)
    w2 = w1 - lr * (m * v_w + local_w2 * (gw2 + wd * w1))
    assert b1.norm() < 0.01  # still under the threshold
    b2 = b1 - lr * (m * v_b + gb2 + wd * b1)
    torch.testing.assert_close(lin.weight.detach(), w2)
    torch.testing.assert_close(lin.bias.detach(), b2)


def test_lars_threshold_is_on_the_weight_norm_not_the_gradient_norm():
    w = nn.Parameter(torch.full((4,), 0.5))  # ||w|| = 1
    z = nn.Parameter(torch.full((4,), 0.5))
    opt = LARS([w, z], lr=0.1, momentum=0.0, weight_decay=0.0, eps=1e-9, threshold=1e-2)
    w.grad = torch.full((4,), 1e-4)  # ||g|| = 2e-4, far below the threshold: still trust ratio 1/2e-4
    z.grad = torch.zeros(4)  # a zero gradient: local lr 1, not 1/eps
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.5) - 0.1 * (1.0 / 2e-4) * 1e-4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.detach(), torch.full((4,), 0.5))


def test_lars_skips_parameters_without_gradients():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = LARS([a, b], lr=0.1, weight_decay=1e-3)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3))


# --------------------------------------------------------------------------- weight-decay groups
class ConvBNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, bias=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_no_weight_decay_on_bn_spares_exactly_the_bn_parameters():
    # as the reference's train.py that produced the README's table: every name without 'bn' decays
    model = ConvBNLinear()
    assert decayed_parameter_names(model, no_weight_decay_on_bn=True) == [
        "conv1.weight", "conv1.bias", "conv2.weight", "fc.weight", "fc.bias"]
    assert decayed_parameter_names(model, no_weight_decay_on_bn=False) == [n for n, _ in model.named_parameters()]

    groups = param_groups(model, 5e-4, no_weight_decay_on_bn=True)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups[1]["params"]) == [
        "bn1.bias", "bn1.weight", "bn2.bias", "bn2.weight"]
    off = param_groups(model, 5e-4, no_weight_decay_on_bn=False)
    assert len(off) == 1 and off[0]["weight_decay"] == 5e-4 and len(off[0]["params"]) == 9


def test_param_groups_skip_frozen_and_shared_parameters():
    model = ConvBNLinear()
    model.conv2.weight.requires_grad_(False)
    model.extra = nn.Linear(4, 10)
    model.extra.weight = model.fc.weight  # tied: listed once, under its first owner
    assert decayed_parameter_names(model) == ["conv1.weight", "conv1.bias", "fc.weight", "fc.bias", "extra.bias"]
    assert sum(len(g["params"]) for g in param_groups(model, 1e-4, True)) == 9 - 1 + 1  # - frozen + extra.bias


# --------------------------------------------------------------------------- torch optimizers
@pytest.mark.parametrize("name", ["adam", "amsgrad"])
def test_adam_and_amsgrad_use_configured_betas(name):
    cfg = cfg_with(train__optimizer=name, train__base_lr=1e-3, optim__adam__betas=[0.8, 0.95],
                   train__no_weight_decay_on_bn=True)
    model = ConvBNLinear()
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.Adam
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["amsgrad"] == (name == "amsgrad")
    assert opt.defaults["foreach"] is True  # CPU parameters: multi-tensor, not fused
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert ("max_exp_avg_sq" in opt.state[model.fc.weight]) == (name == "amsgrad")


def test_sgd_settings():
    opt = build_optimizer(cfg_with(train__momentum=0.8, train__nesterov=True), ConvBNLinear())
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] and opt.defaults["foreach"]
    plain = build_optimizer(cfg_with(train__momentum=0.0, train__nesterov=True), ConvBNLinear())
    assert not plain.defaults["nesterov"]  # torch forbids Nesterov without momentum


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels need CUDA")
def test_cuda_parameters_get_fused_kernels():
    for name in ("sgd", "adam"):
        opt = build_optimizer(cfg_with(train__optimizer=name), ConvBNLinear().cuda())
        assert opt.defaults["fused"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lars_on_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (10, 16), (10,)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        ps = [nn.Parameter(w.to(device, dtype)) for w in weights]
        groups = [{"params": [ps[0], ps[2]], "weight_decay": 5e-4}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}]
        opt = LARS(groups, lr=0.02, momentum=0.9)
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.to(device, dtype)
            opt.step()
        results.append([p.detach().float().cpu() for p in ps])
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


def test_unknown_optimizer_is_a_clear_error():
    cfg = config.Config()
    cfg.train.optimizer = "rmsprop"  # config.validate would reject it; build_optimizer must too
    with pytest.raises(ValueError, match="train.optimizer.*rmsprop"):
        build_optimizer(cfg, ConvBNLinear())


# --------------------------------------------------------------------------- LR schedules
SPE = 5  # steps per epoch


def curve(cfg, steps=None):
    steps = cfg.scheduler.epochs * SPE if steps is None else steps
    return [lr_factor(cfg, s, SPE) for s in range(steps + 1)]


def test_constant():
    assert set(curve(cfg_with(scheduler__type="constant", scheduler__epochs=4))) == {1.0}


def test_multistep_decays_on_the_step_after_each_milestone():
    # the reference's boundary convention (bisect_left): the milestone's own step keeps the old lr
    cfg = cfg_with(scheduler__type="multistep", scheduler__epochs=10, scheduler__milestones=[4, 7],
                   scheduler__lr_decay=0.1)
    f = curve(cfg)
    assert f[4 * SPE] == 1.0 and f[4 * SPE + 1] == pytest.approx(0.1)
    assert f[7 * SPE] == pytest.approx(0.1) and f[7 * SPE + 1] == pytest.approx(0.01)
    assert f[-1] == pytest.approx(0.01)


def test_linear_ends_at_min_factor():
    f = curve(cfg_with(scheduler__type="linear", scheduler__epochs=4, scheduler__lr_min_factor=0.01))
    assert f[0] == 1.0 and f[2 * SPE] == pytest.approx((1 + 0.01) / 2) and f[-1] == pytest.approx(0.01)
    assert f[-2] == pytest.approx(0.01 + 0.99 / (4 * SPE))


def test_cosine_ends_at_min_factor():
    f = curve(cfg_with(scheduler__type="cosine", scheduler__epochs=6, scheduler__lr_min_factor=0.01))
    assert f[0] == 1.0
    assert f[3 * SPE] == pytest.approx((1 + 0.01) / 2)
    assert f[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(f, f[1:]))


@pytest.mark.parametrize(("t_mul", "restarts", "cycles"), [
    (1.0, [2, 4, 6, 8, 10, 12], [2, 2, 2, 2, 2, 2]),
    (2.0, [2, 6], [2, 4, 8]),  # T0, T0 + T0*T_mul; the third cycle ends with the run at 14
])
def test_sgdr_restarts(t_mul, restarts, cycles):
    m = 0.001
    cfg = cfg_with(scheduler__type="sgdr", scheduler__epochs=14, scheduler__T0=2, scheduler__T_mul=t_mul,
                   scheduler__lr_min_factor=m)
    f = curve(cfg)
    starts = [0] + restarts
    for start, length in zip(starts, cycles):
        s0, n = start * SPE, length * SPE
        # every cycle restarts at the base lr on the step after the previous one ends at eta_min
        assert f[s0 + (start > 0)] == (1.0 if start == 0 else pytest.approx(
            m + (1 - m) * 0.5 * (1 + math.cos(math.pi / n))))
        assert f[s0 + n // 2] == pytest.approx((1 + m) / 2)  # cycle midpoint
        assert f[s0 + n] == pytest.approx(m)
    assert [(s - 1) // SPE for s in range(1, len(f)) if f[s] > f[s - 1]] == restarts
    assert f[-1] == pytest.approx(m)  # the restart due exactly at the end is not taken


def test_linear_warmup_is_prepended():
    cfg = cfg_with(scheduler__type="cosine", scheduler__epochs=10, scheduler__lr_min_factor=0.0,
                   scheduler__warmup__type="linear", scheduler__warmup__epochs=2,
                   scheduler__warmup__start_factor=0.1)
    f = curve(cfg)
    assert f[0] == pytest.approx(0.1)
    assert f[SPE] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a < b for a, b in zip(f[:2 * SPE], f[1:2 * SPE + 1]))
    assert f[2 * SPE] == 1.0  # warmup end = main schedule start
    assert f[6 * SPE] == pytest.approx(0.5)  # cosine midpoint: halfway through the 8 post-warmup epochs
    assert f[-1] == pytest.approx(0.0)


def test_exponential_warmup_and_milestones_counted_from_warmup_end():
    cfg = cfg_with(scheduler__type="multistep", scheduler__epochs=10, scheduler__milestones=[3],
                   scheduler__lr_decay=0.5, scheduler__warmup__type="exponential",
                   scheduler__warmup__epochs=2, scheduler__warmup__exponent=4.0)
    f = curve(cfg)
    sf = cfg.scheduler.warmup.start_factor
    assert f[0] == sf
    assert f[SPE] == pytest.approx(sf + (1 - sf) * 0.5 ** 4)
    assert f[2 * SPE - 1] == pytest.approx(sf + (1 - sf) * ((2 * SPE - 1) / (2 * SPE)) ** 4)
    assert f[2 * SPE] == 1.0
    assert f[5 * SPE] == 1.0 and f[5 * SPE + 1] == 0.5  # milestone 3 = epoch 2 + 3


def test_invalid_schedules_raise():
    with pytest.raises(ValueError, match="T_mul"):
        lr_factor(cfg_with(scheduler__type="sgdr", scheduler__T_mul=0.5), 0, SPE)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_factor(cfg_with(), 0, 0)


def _setup(cfg):
    torch.manual_seed(0)
    model = ConvBNLinear()
    opt = build_optimizer(cfg, model)
    return model, opt, build_scheduler(cfg, opt, SPE)


def _train(model, opt, sched, steps, lrs):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()


def test_scheduler_follows_lr_factor_for_every_group():
    cfg = cfg_with(scheduler__type="cosine", scheduler__epochs=4, scheduler__warmup__type="linear",
                   scheduler__warmup__epochs=1, train__no_weight_decay_on_bn=True, train__base_lr=0.4)
    model, opt, sched = _setup(cfg)
    lrs = []
    _train(model, opt, sched, 4 * SPE, lrs)
    assert len(lrs[0]) == 2
    for s, pair in enumerate(lrs):
        assert pair[0] == pair[1] == pytest.approx(0.4 * lr_factor(cfg, s, SPE))


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_scheduler_state_round_trip_resumes_exactly(scheduler_first):
    cfg = cfg_with(train__optimizer="lars", train__base_lr=0.02, scheduler__type="sgdr", scheduler__epochs=6,
                   scheduler__T0=1, scheduler__T_mul=2.0, scheduler__warmup__type="exponential",
                   scheduler__warmup__epochs=1)
    model, opt, sched = _setup(cfg)
    straight = []
    _train(model, opt, sched, 12, straight)
    _train(model, opt, sched, 8, straight)
    final = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = _setup(cfg)
    resumed = []
    _train(model, opt, sched, 12, resumed)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain values only

    model, opt, sched = _setup(cfg)
    model.load_state_dict(ckpt["model"])
    if scheduler_first:
        sched.load_state_dict(ckpt["sched"])
        opt.load_state_dict(ckpt["opt"])
    else:
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
    assert sched.last_epoch == 12
    _train(model, opt, sched, 8, resumed)
    assert resumed == straight
    for a, b in zip(model.parameters(), final):
        assert torch.equal(a.detach(), b)
