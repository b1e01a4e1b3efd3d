"""The reference implementation as a test oracle (../shared/reference, see its ORACLE.md).

Tests import it from there at test time, never from the project: ``ref`` (the fixture in this
folder's conftest) skips with the reason when the reference or its packages are absent, and
fails under CI, which provides them.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE_DIR = Path(os.environ.get("IMGCLF_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
RECIPES = REPO / "config" / "recipes"


def reference_missing() -> str | None:
    if not (REFERENCE_DIR / "pytorch_image_classification").is_dir():
        return f"the reference implementation is not in {REFERENCE_DIR} (set IMGCLF_REFERENCE_DIR)"
    for name in ("yacs", "fvcore", "termcolor", "thop", "tensorboard"):
        try:
            importlib.import_module(name)
        except ImportError:
            return f"the reference needs '{name}' (pip install -e '.[dev]')"
    return None


def load_reference():
    """The reference package ``pytorch_image_classification`` (check reference_missing first)."""
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    return importlib.import_module("pytorch_image_classification")


def reference_config(ref, recipe: str, options: dict | None = None):
    """A reference config built the way its train.py does: defaults, the recipe under
    ``configs/`` (same relative name as ours, e.g. ``cifar/resnet_preact.yaml``), the KEY VALUE
    options, then ``update_config``; on CPU, frozen."""
    cfg = ref.get_default_config()
    cfg.merge_from_file(str(REFERENCE_DIR / "configs" / recipe))
    items: list = []
    for key, value in (options or {}).items():
        items += [key, value]
    items += ["device", "cpu", "train.dataloader.pin_memory", False]
    cfg.merge_from_list(items)
    cfg = ref.update_config(cfg)
    cfg.freeze()
    return cfg


# ---- models ----------------------------------------------------------------------------------

# The reference's geometry of each dataset (its update_config); imgclf's own 'digits' (1 x 8 x 8)
# has no reference counterpart, so its model configs are compared on MNIST's geometry.
REFERENCE_DATASET = {"digits": "MNIST"}


def table_model_configs() -> list[dict]:
    """Every distinct model configuration the tables train, from imgclf's own plan: one entry per
    (reference dataset, model name, its options, init_mode), with the rows that use it."""
    import json

    from imgclf.tables.plan import Plan

    plan = Plan.from_dir(REPO / "config" / "tables", REPO / "config" / "recipes")
    seen: dict[tuple, dict] = {}
    for run in plan.runs.values():
        c = run.config
        name = c["model"]["name"]
        dataset = REFERENCE_DATASET.get(c["dataset"]["name"], c["dataset"]["name"])
        if dataset in ("MNIST", "FashionMNIST", "KMNIST"):
            dataset = "MNIST"  # same geometry (1 x 28 x 28, 10 classes): one model
        key = (dataset, name, json.dumps(c["model"][name], sort_keys=True), c["model"]["init_mode"])
        entry = seen.setdefault(key, {"dataset": dataset, "name": name, "options": dict(c["model"][name]),
                                      "init_mode": c["model"]["init_mode"], "rows": []})
        entry["rows"] += run.rows
    return sorted(seen.values(), key=lambda e: (e["name"], e["dataset"], json.dumps(e["options"], sort_keys=True),
                                                e["init_mode"]))


def model_config_id(entry: dict) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(entry["options"].items()) if k != "n_blocks")
    return f"{entry['name']}[{entry['dataset']},{entry['init_mode']}]({opts})".replace(" ", "")


def reference_model(ref, entry: dict):
    """The reference's Network for an entry of :func:`table_model_configs`, built as its
    train.py does (recipe configs/cifar/<name>.yaml, then the options)."""
    import torch

    default = ref.get_default_config().model[entry["name"]]
    options = {"dataset.name": entry["dataset"], "model.init_mode": entry["init_mode"]}
    for key, value in entry["options"].items():
        if key in default:
            old = default[key]
            value = type(old)(value) if isinstance(old, (int, float, bool)) and not isinstance(value, list) else value
            options[f"model.{entry['name']}.{key}"] = value
    cfg = reference_config(ref, f"cifar/{entry['name']}.yaml", options)
    from pytorch_image_classification.models import create_model

    model = create_model(cfg)
    geometry = (cfg.dataset.n_channels, cfg.dataset.image_size, cfg.dataset.n_classes)
    return model.to(torch.device("cpu")), geometry


def our_model(entry: dict, geometry: tuple[int, int, int]):
    from imgclf import models

    channels, _, n_classes = geometry
    return models.create(entry["name"], in_channels=channels, n_classes=n_classes, init_mode=entry["init_mode"],
                         **entry["options"])


LEAVES = ("Conv2d", "Linear", "BatchNorm2d")


def execution_order(model, x) -> list[str]:
    """Names of the weight-holding layers (conv, linear, BN) in the order one eval forward
    pass calls them."""
    import torch

    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=name: order.append(n))
               for name, m in model.named_modules() if type(m).__name__ in LEAVES]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order


def layer_mapping(ours, theirs, x) -> dict[str, str]:
    """Our layer name -> the reference's, pairing the layers in call order and checking that
    paired layers are of the same kind with the same tensor shapes (the state-dict mapper)."""
    a, b = execution_order(ours, x), execution_order(theirs, x)
    assert len(a) == len(b), f"{len(a)} layers called in ours, {len(b)} in the reference"
    mods_a, mods_b = dict(ours.named_modules()), dict(theirs.named_modules())
    for na, nb in zip(a, b):
        ma, mb = mods_a[na], mods_b[nb]
        assert type(ma) is type(mb), f"{na} ({type(ma).__name__}) vs reference {nb} ({type(mb).__name__})"
        sa = {k: tuple(v.shape) for k, v in ma.state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in mb.state_dict().items()}
        assert sa == sb, f"{na} {sa} vs reference {nb} {sb}"
        if type(ma).__name__ == "Conv2d":
            for attr in ("stride", "padding", "groups", "dilation"):
                assert getattr(ma, attr) == getattr(mb, attr), f"{na}.{attr} vs reference {nb}"
    assert len(set(a)) == len(a) == len(set(b)), "a layer is called twice"
    return dict(zip(a, b))


def copy_reference_weights(ours, theirs, mapping: dict[str, str]) -> None:
    """Load the reference's parameters and buffers (BN running statistics included) into ours."""
    mods_a, mods_b = dict(ours.named_modules()), dict(theirs.named_modules())
    for na, nb in mapping.items():
        mods_a[na].load_state_dict(mods_b[nb].state_dict())


# --------------------------------------------------------------------------- schedules (i14b)
TRAIN_SIZES = {"CIFAR10": 50000, "CIFAR100": 50000, "MNIST": 60000, "FashionMNIST": 60000, "KMNIST": 60000,
               "digits": 1347}


def reference_recipe_exists(recipe: str) -> bool:
    return (REFERENCE_DIR / "configs" / recipe).is_file()


def reference_schedule_factors(ref, cfg, steps_per_epoch: int, steps):
    """The reference scheduler's LambdaLR factor at every step of ``steps`` (a numpy int array).

    It evaluates the reference's own pieces (``CombinedScheduler.schedulers``) on arrays, choosing
    the piece as its ``__call__`` does (``bisect_left`` on the offsets = ``searchsorted(side='left')``);
    ``reference_schedule_factor_scalar`` is the reference's own per-step call, to spot-check this."""
    import numpy as np

    func = _reference_lambda(ref, cfg, steps_per_epoch)
    offsets = np.asarray(func._offsets)
    index = np.clip(np.searchsorted(offsets, steps, side="left") - 1, 0, len(func.schedulers) - 1)
    out = np.empty(len(steps), dtype=np.float64)
    for k, piece in enumerate(func.schedulers):
        sel = index == k
        if sel.any():
            out[sel] = piece((steps[sel] - offsets[k]).astype(np.float64))
    return out


def reference_schedule_factor_scalar(ref, cfg, steps_per_epoch: int, step: int) -> float:
    return float(_reference_lambda(ref, cfg, steps_per_epoch)(step))


def _reference_lambda(ref, cfg, steps_per_epoch: int):
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.train.base_lr)
    return ref.create_scheduler(cfg, opt, steps_per_epoch).lr_lambdas[0]


# --------------------------------------------------------------------------- parameters (i14b)
def _param_kind(module) -> str:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        return "norm"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


def paired_parameters(ref_model, our_model) -> list[tuple[str, object, str, object]]:
    """(reference name, its tensor, our name, our tensor) for every parameter.

    Tensors pair up by (layer kind, weight|bias, shape), in module order within each such
    group: enough for per-tensor comparisons (an optimizer step, a weight-decay decision) even
    where the two models list a block's layers in different orders."""
    def groups(model):
        out: dict[tuple, list] = {}
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                key = (_param_kind(module), pname, tuple(p.shape))
                out.setdefault(key, []).append((f"{mname}.{pname}" if mname else pname, p))
        return out

    theirs, ours = groups(ref_model), groups(our_model)
    if {k: len(v) for k, v in theirs.items()} != {k: len(v) for k, v in ours.items()}:
        raise AssertionError("the two models' parameters differ in kind, shape or number")
    return [(rn, rp, on, op) for key in theirs for (rn, rp), (on, op) in zip(theirs[key], ours[key])]


def augmentation_config(ref, **aug):
    """The reference's default config with ``augmentation.<key>`` values set, e.g.
    ``augmentation_config(ref, use_ricap=True, **{"cutout.mask_size": 8})``."""
    cfg = ref.get_default_config()
    for key, value in aug.items():
        node, _, leaf = key.rpartition(".")
        target = cfg.augmentation
        for part in filter(None, node.split(".")):
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg
