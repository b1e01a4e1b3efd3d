"""Models against the reference: every distinct model configuration the tables train,
enumerated from imgclf's own plan. The reference's weights (and BN statistics, randomized so
that eval mode is not a no-op) are copied into ours through a layer mapping built from the
order in which a forward pass calls the layers; then eval-mode outputs agree to 1e-5, and
parameter counts and buffer shapes are equal. Shake-shake also agrees in training mode:
with the same seed the same coefficients are drawn, so outputs, input gradients (beta in the
backward pass) and BN running statistics agree.
"""
from __future__ import annotations

import pytest
import torch

from oracle import copy_reference_weights, layer_mapping, model_config_id, our_model, reference_model, \
    table_model_configs

# The reference's packages use deprecated APIs (thop's LooseVersion, autograd's saved_variables).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIGS = table_model_configs()
FAMILIES = ("densenet", "pyramidnet", "resnet", "resnet_preact", "resnext", "se_resnet_preact", "shake_shake",
            "vgg", "wrn")
# Not in any table: the SE network is compared on its recipe's flags (the reference's se_resnet_preact.yaml).
SE = {"dataset": "CIFAR10", "name": "se_resnet_preact", "init_mode": "kaiming_fan_out", "rows": [],
      "options": {"depth": 110, "initial_channels": 16, "block_type": "basic", "se_reduction": 16,
                  "remove_first_relu": True, "add_last_bn": True, "preact_stage": [True, False, False]}}
ALL = CONFIGS + [SE]


def _randomize_bn(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5


def _pair(ref, entry):
    torch.manual_seed(0)
    theirs, geometry = reference_model(ref, entry)
    ours = our_model(entry, geometry)
    channels, size, _ = geometry
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    return ours, theirs, x


def test_the_tables_train_every_family_but_se():
    assert {e["name"] for e in CONFIGS} == set(FAMILIES) - {"se_resnet_preact"}
    # Every size: e.g. all five shake-shake widths/geometries and both PyramidNet block types.
    assert len(CONFIGS) >= 30


@pytest.mark.parametrize("entry", ALL, ids=[model_config_id(e) for e in ALL])
def test_eval_outputs_agree_with_the_reference_weights(ref, entry):
    ours, theirs, x = _pair(ref, entry)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert sorted(tuple(b.shape) for b in ours.buffers()) == sorted(tuple(b.shape) for b in theirs.buffers())
    mapping = layer_mapping(ours, theirs, x)
    # Every parameter and buffer of ours is reached through the mapping.
    assert sum(sum(t.numel() for t in m.state_dict().values()) for n, m in ours.named_modules() if n in mapping) \
        == sum(t.numel() for t in ours.state_dict().values())
    _randomize_bn(theirs, seed=2)
    copy_reference_weights(ours, theirs, mapping)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        want, got = theirs(x.clone()), ours(x.clone())
    assert got.shape == want.shape
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-5 * scale, f"max |diff| {(got - want).abs().max():.3g}"


SHAKE = [e for e in CONFIGS if e["name"] == "shake_shake"]
SMALLEST_SHAKE = min(SHAKE, key=lambda e: e["options"]["initial_channels"])
SWITCHES = [SMALLEST_SHAKE | {"options": SMALLEST_SHAKE["options"] | dict(zip(
    ("shake_forward", "shake_backward", "shake_image"), s))}
    for s in [(True, True, True), (True, True, False), (True, False, True), (False, True, True),
              (False, False, False)]]


@pytest.mark.parametrize("entry", SHAKE + SWITCHES, ids=[model_config_id(e) for e in SHAKE + SWITCHES])
def test_shake_shake_training_mode_agrees(ref, entry):
    ours, theirs, x = _pair(ref, entry)
    mapping = layer_mapping(ours, theirs, x)
    copy_reference_weights(ours, theirs, mapping)
    outs, grads = [], []
    for model in (theirs, ours):
        model.train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same alpha and beta draws, in the same order
        y = model(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        outs.append(y.detach())
        grads.append(xi.grad)
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * max(1.0, outs[0].abs().max().item())
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * max(1e-3, grads[0].abs().max().item())
    mods_a, mods_b = dict(ours.named_modules()), dict(theirs.named_modules())
    for na, nb in mapping.items():
        if isinstance(mods_a[na], torch.nn.BatchNorm2d):
            torch.testing.assert_close(mods_a[na].running_mean, mods_b[nb].running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mods_a[na].running_var, mods_b[nb].running_var, rtol=1e-5, atol=1e-6)


# No table row trains with dropout, but the recipes offer it (WRN "w/ dropout"): where the
# reference draws its masks, ours must too (same seed, same masks, same training-mode output).
DROPOUT = [
    {"dataset": "CIFAR10", "name": "wrn", "init_mode": "kaiming_fan_in", "rows": [],
     "options": {"depth": 16, "widening_factor": 2, "initial_channels": 16, "drop_rate": 0.3}},
    {"dataset": "CIFAR10", "name": "densenet", "init_mode": "kaiming_fan_out", "rows": [],
     "options": {"depth": 40, "block_type": "bottleneck", "growth_rate": 12, "drop_rate": 0.2,
                 "compression_rate": 0.5}},
]


@pytest.mark.parametrize("entry", DROPOUT, ids=[model_config_id(e) for e in DROPOUT])
def test_dropout_training_mode_agrees(ref, entry):
    ours, theirs, x = _pair(ref, entry)
    copy_reference_weights(ours, theirs, layer_mapping(ours, theirs, x))
    outs = []
    for model in (theirs, ours):
        torch.manual_seed(4)
        with torch.no_grad():
            outs.append(model.train()(x.clone()))
    torch.manual_seed(5)
    with torch.no_grad():
        other = ours(x.clone())
    assert (outs[1] - outs[0]).abs().max() <= 1e-5 * max(1.0, outs[0].abs().max().item())
    assert (other - outs[0]).abs().max() > 1e-3  # the masks matter: another seed, another output
