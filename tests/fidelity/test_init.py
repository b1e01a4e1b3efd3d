"""Initialisation against the reference's initializer: for each family (its smallest
table configuration) and each ``model.init_mode``, every conv and fully connected layer's weight
mean and std agree with the reference layer's, within the sampling error of two independent
draws; BN starts at weight 1 / bias 0 and linear biases at 0, exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from oracle import layer_mapping, model_config_id, our_model, reference_model, table_model_configs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INIT_MODES = ("kaiming_fan_out", "kaiming_fan_in")


def _smallest_per_family() -> list[dict]:
    best: dict[str, dict] = {}
    for e in table_model_configs():
        o = e["options"]
        size = (o.get("depth", 0) * o.get("initial_channels", 1) * o.get("widening_factor", 1)
                * o.get("cardinality", 1) * (1 + o.get("alpha", 0)) * o.get("growth_rate", 1))
        if e["dataset"] == "CIFAR10" and (e["name"] not in best or size < best[e["name"]][0]):
            best[e["name"]] = (size, e)
    se = {"dataset": "CIFAR10", "name": "se_resnet_preact", "rows": [],
          "options": {"depth": 20, "initial_channels": 16, "block_type": "basic", "se_reduction": 16,
                      "remove_first_relu": True, "add_last_bn": True, "preact_stage": [True, False, False]}}
    return [e for _, e in best.values()] + [se]


CASES = [e | {"init_mode": mode} for e in _smallest_per_family() for mode in INIT_MODES]


def test_every_family_is_covered():
    assert len({e["name"] for e in CASES}) == 9


@pytest.mark.parametrize("entry", CASES, ids=[model_config_id(e) for e in CASES])
def test_per_layer_statistics_agree_with_the_reference_initializer(ref, entry):
    torch.manual_seed(0)
    theirs, geometry = reference_model(ref, entry)
    torch.manual_seed(1)  # an independent draw: the statistics, not the values, must agree
    ours = our_model(entry, geometry)
    x = torch.zeros(1, geometry[0], geometry[1], geometry[1])
    mapping = layer_mapping(ours, theirs, x)
    mods_a, mods_b = dict(ours.named_modules()), dict(theirs.named_modules())
    n_linear = 0
    for na, nb in mapping.items():
        a, b = mods_a[na], mods_b[nb]
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), na
            continue
        n_linear += isinstance(a, torch.nn.Linear)
        for attr in ("weight", "bias"):
            wa, wb = getattr(a, attr), getattr(b, attr)
            if wa is None:
                assert wb is None, f"{na}.{attr}"
                continue
            if not wb.any():
                assert not wa.any(), f"{na}.{attr} is zero in the reference"
                continue
            n = wa.numel()
            sigma = wb.std().item()
            # Two independent estimates: mean within 6 standard errors, std within 6 relative
            # standard errors (1/sqrt(2n) each). fan_in vs fan_out, or PyTorch's default
            # uniform init, would differ by a factor of 2 or more on these layers.
            assert abs(wa.mean().item() - wb.mean().item()) <= 6 * sigma * math.sqrt(2 / n), f"{na}.{attr} mean"
            assert abs(wa.std().item() / sigma - 1) <= 6 * math.sqrt(1 / n) + 0.02, \
                f"{na}.{attr} std {wa.std().item():.4g} vs reference {sigma:.4g}"
    assert n_linear >= 1  # the classifier (and SE's layers) included
