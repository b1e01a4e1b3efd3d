"""Precision against the reference. The reference's train.py hands apex nothing but
``opt_level``, so its rows ran apex's defaults: the ``fp16`` rows (O3) in pure fp16 with
BatchNorm in fp16, no fp32 master weights and a static loss scale of 1.0. imgclf's fp16 must be
that, and O0-O2 must map as the precision module documents. (CPU only: what the engine casts
and steps is checked on the device-independent pieces it uses.)
"""
from __future__ import annotations

import ast

import pytest
import torch

from imgclf import config as C
from imgclf.engine.precision import Precision
from imgclf.models import build as build_model
from imgclf.optim import build_optimizer

from oracle import REFERENCE_DIR, RECIPES

CUDA = torch.device("cuda")  # a device object only: nothing is placed on it


def _amp_initialize_keywords() -> list[str]:
    tree = ast.parse((REFERENCE_DIR / "train.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "initialize"]
    assert len(calls) == 1
    return [k.arg for k in calls[0].keywords]


def test_the_reference_runs_apex_defaults(ref):
    # No keep_batchnorm_fp32, master_weights or loss_scale override: O3 is fp16 BN, no master
    # weights, loss scale 1.0 (apex's O3 defaults).
    assert _amp_initialize_keywords() == ["opt_level"]
    assert ref.get_default_config().train.precision == "O0"


@pytest.mark.parametrize("level,mode", [("O0", "fp32"), ("O1", "amp"), ("O2", "amp"), ("O3", "fp16"),
                                        ("fp16", "fp16"), ("amp", "amp"), ("fp32", "fp32")])
def test_apex_levels_map_as_documented(level, mode):
    cfg = C.build(RECIPES / "cifar" / "resnet_preact.yaml", {"train.precision": level})
    assert Precision(C.precision(cfg), CUDA).name == mode


def _fp16_rows() -> list[dict]:
    from oracle import REPO
    from imgclf.tables.plan import Plan

    plan = Plan.from_dir(REPO / "config" / "tables", REPO / "config" / "recipes")
    return [r.config for r in plan.runs.values() if r.config["train"]["precision"] in ("fp16", "O3")]


def test_the_fp16_tables_run_o3():
    rows = _fp16_rows()
    assert len(rows) == 7  # the README's FP16 column: batch 128 ... 8192


def test_o3_puts_everything_in_fp16_batchnorm_included():
    cfg = C.build(RECIPES / "cifar" / "resnet_preact.yaml", {"train.precision": "O3", "model.resnet_preact.depth": 20})
    precision = Precision(C.precision(cfg), CUDA)
    model = precision.cast_model(build_model(cfg, in_channels=3, n_classes=10))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight.dtype == m.running_var.dtype == torch.float16 for m in bns)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float16}
    # No fp32 master weights: the optimizer steps the model's own fp16 tensors.
    optimizer = build_optimizer(cfg, model)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in stepped} == {id(p) for p in model.parameters()}
    assert all(p.dtype == torch.float16 for p in stepped)
    # Static loss scale 1.0: no scaler at work; the loss goes to backward as it is.
    scaler = precision.make_scaler()
    loss = torch.tensor(3.0)
    assert not scaler.is_enabled() and scaler.get_scale() == 1.0 and scaler.scale(loss) is loss


@pytest.mark.parametrize("mode", ["fp32", "amp", "bf16"])
def test_other_modes_keep_fp32_weights(mode):
    cfg = C.build(RECIPES / "cifar" / "resnet_preact.yaml", {"model.resnet_preact.depth": 20})
    model = Precision(mode, CUDA).cast_model(build_model(cfg, in_channels=3, n_classes=10))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_trainer_builds_o3_as_apex_does(tmp_path, monkeypatch):
    """The engine's own model, optimizer and scaler for an O3 run (set up on CPU: the CUDA check is
    bypassed, nothing is trained): BN in fp16, the optimizer on the fp16 weights, no loss scaling."""
    from imgclf import runs
    from imgclf.engine import Trainer

    monkeypatch.setattr(Precision, "__post_init__", lambda self: None)
    cfg = C.build(RECIPES / "digits" / "resnet_preact.yaml",
                  {"model.resnet_preact.depth": 8, "model.resnet_preact.initial_channels": 8,
                   "train.precision": "O3", "device": "cpu"})
    trainer = Trainer(runs.prepare(cfg, tmp_path / "run", resume=True), progress=False)
    bns = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight.dtype == m.running_mean.dtype == torch.float16 for m in bns)
    stepped = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in stepped} == {id(p) for p in trainer.model.parameters()}
    assert all(p.dtype == torch.float16 for p in stepped)
    assert not trainer.scaler.is_enabled()
