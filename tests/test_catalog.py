"""The catalog is the one place that states a model family or a dataset: a family added there
(and nowhere else in the library) gets config keys, checks, a builder, planned runs and training."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch.nn as nn
import yaml
from conftest import REPO

from imgclf import catalog, config as C, pipeline, runs
from imgclf.models import register
from imgclf.tables import plan

BASE = REPO / "config" / "recipes" / "digits" / "resnet_preact.yaml"


# --------------------------------------------------------------------------- a toy family
@dataclass
class ToyConfig:
    width: int = 8  # maps of both convolutions


class Toy(nn.Module):
    """Two 3x3 convolutions, global pooling, a linear classifier."""

    def __init__(self, width: int, in_channels: int, n_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.fc(self.features(x))


@register("toy")  # what the family's model file does
def toy(*, width=8, in_channels=1, n_classes=10):
    return Toy(width, in_channels, n_classes)


TOY = catalog.ModelFamily("toy", ToyConfig, __name__, ranges={"width": catalog.POSITIVE})

TOY_RECIPE = """\
dataset: {name: digits}
model:
  name: toy
  toy: {width: 32}
train: {batch_size: 32, base_lr: 0.1, weight_decay: 5.0e-4, checkpoint_period: 5}
validation: {batch_size: 512}
scheduler: {epochs: 3, type: cosine, lr_min_factor: 0.0}
augmentation: {random_crop: {padding: 1}, use_random_horizontal_flip: false}
"""


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(catalog.MODELS, "toy", TOY)
    yield TOY


def test_a_family_added_to_the_catalog_alone_is_planned_and_trained(toy_family, tmp_path):
    recipes, tables = tmp_path / "recipes", tmp_path / "tables"
    (recipes / "digits").mkdir(parents=True)
    tables.mkdir()
    (recipes / "digits" / "toy.yaml").write_text(TOY_RECIPE)
    (tables / "toys.yaml").write_text(yaml.safe_dump({"title": "Toys", "seeds": [0], "rows": [
        {"id": "toy32", "label": "Toy-32", "recipe": "digits/toy.yaml", "overrides": {}}]}))

    planned = plan.Plan.from_dir(tables, recipes)
    (run,) = planned.runs.values()
    assert run.run_id.startswith("digits-toy-") and run.rows == ["toys/toy32"] and run.seeds == {0}
    assert run.config["model"]["toy"] == {"width": 32}

    result = pipeline.train_seed(tmp_path / "runs" / run.run_id / "seed0", run.config, 0, progress=False)
    assert result["epochs"] == 3
    # 3 epochs of a 2-layer net on the digits, in a second or two (measured: 43.6% test error; chance is 90%)
    assert result["test_error"] < 60.0
    evaluated = json.loads((tmp_path / "runs" / run.run_id / "seed0" / "eval.json").read_text())
    assert evaluated["test_error"] == result["test_error"]


def test_a_catalog_family_gets_its_keys_and_checks(toy_family):
    cfg = C.build(BASE, {"model.name": "toy", "model.toy.width": 4})
    assert cfg.model.toy.width == 4 and "model.toy.width" in C.all_keys()
    with pytest.raises(C.ConfigError, match=r"^override model\.toy\.width: must be > 0, got 0$"):
        C.build(BASE, {"model.name": "toy", "model.toy.width": 0})
    with pytest.raises(C.ConfigError, match="unknown config key 'model.toy.widht'; did you mean 'model.toy.width'"):
        C.build(BASE, {"model.toy.widht": 4})
    with pytest.raises(C.ConfigError, match="model.name: 'tyo' is not one of .*toy.*did you mean 'toy'"):
        C.build(BASE, {"model.name": "tyo"})
    assert runs.input_shape(cfg) == (1, 8, 8) and runs.n_classes(cfg) == 10


def test_a_new_family_leaves_every_other_run_id_as_it_was(monkeypatch):
    before = runs.run_id(C.build(BASE))
    with monkeypatch.context() as m:
        m.setitem(catalog.MODELS, "toy", TOY)
        assert runs.run_id(C.build(BASE)) == before
        toy_id = runs.run_id(C.build(BASE, {"model.name": "toy"}))
        assert toy_id != runs.run_id(C.build(BASE, {"model.name": "toy", "model.toy.width": 9}))
    # Gone from the catalog, gone from the schema.
    with pytest.raises(C.ConfigError, match="unknown config key 'model.toy.width'"):
        C.build(BASE, {"model.toy.width": 4})
    assert runs.run_id(C.build(BASE)) == before


def test_depth_rules_and_block_types_come_from_the_entry(monkeypatch):
    @dataclass
    class Stacked:
        depth: int = 5
        block_type: str = "plain"

    m = catalog.ModelFamily("stacked", Stacked, __name__, {"plain": (3, 2)}, ("plain", "wide"))
    monkeypatch.setitem(catalog.MODELS, "stacked", m)
    assert C.build(BASE, {"model.name": "stacked", "model.stacked.depth": 8}).model.stacked.depth == 8
    with pytest.raises(C.ConfigError, match=r"model\.stacked\.depth: 7 is not 3n\+2 with block_type 'plain' "
                                            r"\(e\.g\. 5, 8, 11, 29, 56\)"):
        C.build(BASE, {"model.name": "stacked", "model.stacked.depth": 7})
    with pytest.raises(C.ConfigError, match="model.stacked.block_type: 'narrow' is not one of plain, wide"):
        C.build(BASE, {"model.name": "stacked", "model.stacked.block_type": "narrow"})


def test_shipped_families_keep_their_rules():
    """The catalog's entries, as the error messages show them."""
    for overrides, message in [
        ({"model.resnet_preact.depth": 21}, "model.resnet_preact.depth: 21 is not 6n+2 with block_type 'basic'"),
        ({"model.name": "wrn", "model.wrn.depth": 26}, "model.wrn.depth: 26 is not 6n+4 (e.g. 10, 16, 22, 58, 112)"),
        ({"model.name": "densenet", "model.densenet.depth": 41},
         "model.densenet.depth: 41 is not 6n+4 with block_type 'bottleneck'"),
        ({"model.name": "densenet", "model.densenet.drop_rate": 1.0}, "model.densenet.drop_rate: must be in [0, 1)"),
        ({"model.name": "pyramidnet", "model.pyramidnet.alpha": -1}, "model.pyramidnet.alpha: must be >= 0"),
        ({"model.name": "vgg", "model.vgg.n_layers": [1]}, "model.vgg.n_layers: expected one entry per stage"),
        ({"model.resnet.block_type": "wide"}, "model.resnet.block_type: 'wide' is not one of basic, bottleneck"),
        ({"dataset.name": "SVHN"}, "dataset.name: 'SVHN' is not one of digits, MNIST, FashionMNIST, KMNIST, "
                                   "CIFAR10, CIFAR100"),
        ({"dataset.n_classes": 50, "dataset.name": "CIFAR100"},
         "dataset.n_classes: 50 is fewer than the 100 classes of CIFAR100"),
        ({"dataset.image_size": 32}, "dataset.image_size: 32 does not match the 8x8 images of digits"),
    ]:
        with pytest.raises(C.ConfigError) as e:
            C.build(BASE, overrides)
        assert message in str(e.value), (overrides, str(e.value))


def test_se_resnet_preact_keeps_its_fixed_initialization():
    from imgclf.models import create

    model = create("se_resnet_preact", in_channels=3, n_classes=10, init_mode="kaiming_fan_in", depth=20)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == m.out_channels == 32)
    # fan_out of a 3x3 conv with 32 output maps, whatever init_mode asked
    assert conv.weight.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.15)


def test_planning_reads_the_catalog_without_importing_torch():
    code = ("import sys; from imgclf.tables import plan; p = plan.Plan.from_dir('config/tables', "
            "'config/recipes'); assert 'torch' not in sys.modules, 'torch imported'; print(len(p.runs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) > 200
