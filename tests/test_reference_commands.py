"""The reference README's commands, transcribed, parsed and (shrunk) run; every augmentation,
optimizer, schedule and precision switched on through the README's own keys; subdivision
(ghost batch) equals the undivided batch for a model without BatchNorm.

Transcription: ``python train.py`` -> ``imgclf train``, ``configs/`` -> ``config/recipes/``;
``python -m torch.distributed.launch --nproc_per_node N train.py ...`` loses its launcher
prefix and keeps ``train.distributed True``. The argument text is the README's, split as a
shell would (``shlex``), so ``' [True, True, True] '`` arrives with its spaces. The machine
translation glued the next heading onto three lines (``augmentation.use_random_crop False2 GPU
を使用します``); those values are ``False``. The README's batch-size / learning-rate sections print
tables only (no commands); their settings are the LARS, ghost BN, no-weight-decay-on-BN and
FP16 commands' keys, all below.

Runs: all 33 CPU-runnable commands run (``imgclf.cli.main``) for one epoch of two steps at
their own batch size (up to 4096, ghost BN's 32 chunks included) on a synthetic
CIFAR-10-shaped cache (2 x batch 3x32x32 images) injected into a per-test IMGCLF_CACHE_DIR,
with the model shrunk (``speed_args``). The two apex O1/O3 commands fail on a CPU-only
machine with a one-line "needs a CUDA device" error, exit code 2 and nothing written; with
CUDA they run like the others.
"""
from __future__ import annotations

import csv
import json
import math
import shlex

import pytest
import torch
import yaml

from conftest import DIGITS, RECIPES, TINY
from imgclf import cli, config as C

CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------- the README's commands
# (section, id, recipe under config/recipes/, the README's KEY VALUE text, {key: resolved value})
COMMANDS = [
    # Usage
    ("usage", "usage", "cifar/resnet_preact.yaml", "",
     {"model.name": "resnet_preact", "model.resnet_preact.depth": 110, "train.batch_size": 128}),
    # CIFAR-10 results (main table)
    ("cifar10", "vgg", "cifar/vgg.yaml", "",
     {"model.name": "vgg", "model.vgg.use_bn": True, "model.vgg.n_channels": [64, 128, 256, 512, 512]}),
    ("cifar10", "resnet", "cifar/resnet.yaml", "",
     {"model.name": "resnet", "model.resnet.depth": 110}),
    ("cifar10", "resnet_preact_basic_110", "cifar/resnet_preact.yaml", """
        train.output_dir experiments/resnet_preact_basic_110/exp00""",
     {"model.resnet_preact.depth": 110, "model.resnet_preact.block_type": "basic",
      "train.output_dir": "experiments/resnet_preact_basic_110/exp00"}),
    ("cifar10", "resnet_preact_bottleneck_164", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 164
        model.resnet_preact.block_type bottleneck
        train.output_dir experiments/resnet_preact_bottleneck_164/exp00""",
     {"model.resnet_preact.depth": 164, "model.resnet_preact.block_type": "bottleneck"}),
    ("cifar10", "wrn", "cifar/wrn.yaml", "",
     {"model.name": "wrn", "model.wrn.depth": 28, "model.wrn.widening_factor": 10}),
    ("cifar10", "densenet", "cifar/densenet.yaml", "",
     {"model.name": "densenet", "model.densenet.depth": 100, "model.densenet.growth_rate": 12}),
    ("cifar10", "pyramidnet_basic_110_84", "cifar/pyramidnet.yaml", """
        model.pyramidnet.depth 110
        model.pyramidnet.block_type basic
        model.pyramidnet.alpha 84
        train.output_dir experiments/pyramidnet_basic_110_84/exp00""",
     {"model.pyramidnet.depth": 110, "model.pyramidnet.block_type": "basic", "model.pyramidnet.alpha": 84}),
    ("cifar10", "pyramidnet_basic_110_270", "cifar/pyramidnet.yaml", """
        model.pyramidnet.depth 110
        model.pyramidnet.block_type basic
        model.pyramidnet.alpha 270
        train.output_dir experiments/pyramidnet_basic_110_270/exp00""",
     {"model.pyramidnet.depth": 110, "model.pyramidnet.block_type": "basic", "model.pyramidnet.alpha": 270}),
    ("cifar10", "resnext_29_4x64d", "cifar/resnext.yaml", """
        model.resnext.cardinality 4
        train.batch_size 32
        train.base_lr 0.025
        train.output_dir experiments/resnext_29_4x64d/exp00""",
     {"model.resnext.cardinality": 4, "train.batch_size": 32, "train.base_lr": 0.025}),
    ("cifar10", "resnext_29_8x64d", "cifar/resnext.yaml", """
        train.batch_size 64
        train.base_lr 0.05
        train.output_dir experiments/resnext_29_8x64d/exp00""",
     {"model.resnext.cardinality": 8, "train.batch_size": 64, "train.base_lr": 0.05}),
    ("cifar10", "shake_shake_26_2x32d_SSI", "cifar/shake_shake.yaml", """
        model.shake_shake.initial_channels 32
        train.output_dir experiments/shake_shake_26_2x32d_SSI/exp00""",
     {"model.shake_shake.initial_channels": 32, "model.shake_shake.depth": 26}),
    ("cifar10", "shake_shake_26_2x64d_SSI", "cifar/shake_shake.yaml", """
        model.shake_shake.initial_channels 64
        train.batch_size 64
        train.base_lr 0.1
        train.output_dir experiments/shake_shake_26_2x64d_SSI/exp00""",
     {"model.shake_shake.initial_channels": 64, "train.batch_size": 64, "train.base_lr": 0.1}),
    ("cifar10", "shake_shake_26_2x96d_SSI", "cifar/shake_shake.yaml", """
        model.shake_shake.initial_channels 96
        train.batch_size 64
        train.base_lr 0.1
        train.output_dir experiments/shake_shake_26_2x96d_SSI/exp00""",
     {"model.shake_shake.initial_channels": 96, "train.batch_size": 64, "train.base_lr": 0.1}),
    # Results with longer training / stronger regularization (cutout etc.)
    ("long_training", "wrn_28_10_cutout16", "cifar/wrn.yaml", """
        train.batch_size 64
        train.output_dir experiments/wrn_28_10_cutout16
        scheduler.type cosine
        augmentation.use_cutout True""",
     {"train.batch_size": 64, "scheduler.type": "cosine", "augmentation.use_cutout": True,
      "augmentation.cutout.mask_size": 16}),
    ("long_training", "shake_shake_26_2x64d_SSI_cutout16", "cifar/shake_shake.yaml", """
        model.shake_shake.initial_channels 64
        train.batch_size 64
        train.base_lr 0.1
        scheduler.epochs 300
        train.output_dir experiments/shake_shake_26_2x64d_SSI_cutout16/exp00
        augmentation.use_cutout True""",
     {"model.shake_shake.initial_channels": 64, "scheduler.epochs": 300, "augmentation.use_cutout": True}),
    # Results using multi-GPU (launcher prefix dropped, train.distributed kept)
    ("multi_gpu", "wrn_28_10_ricap_1gpu", "cifar/wrn.yaml", """
        train.base_lr 0.2
        train.batch_size 512
        scheduler.epochs 200
        scheduler.type cosine
        train.output_dir experiments/wrn_28_10_ricap_1gpu/exp00
        augmentation.use_ricap True
        augmentation.use_random_crop False""",
     {"train.base_lr": 0.2, "train.batch_size": 512, "scheduler.epochs": 200, "augmentation.use_ricap": True,
      "augmentation.use_random_crop": False, "train.distributed": False}),
    ("multi_gpu", "wrn_28_10_ricap_2gpus", "cifar/wrn.yaml", """
        train.distributed True
        train.base_lr 0.2
        train.batch_size 256
        scheduler.epochs 200
        scheduler.type cosine
        train.output_dir experiments/wrn_28_10_ricap_2gpus/exp00
        augmentation.use_ricap True
        augmentation.use_random_crop False""",
     {"train.distributed": True, "train.batch_size": 256, "augmentation.use_ricap": True,
      "augmentation.use_random_crop": False}),
    ("multi_gpu", "wrn_28_10_ricap_4gpus", "cifar/wrn.yaml", """
        train.distributed True
        train.base_lr 0.2
        train.batch_size 128
        scheduler.epochs 200
        scheduler.type cosine
        train.output_dir experiments/wrn_28_10_ricap_4gpus/exp00
        augmentation.use_ricap True
        augmentation.use_random_crop False""",
     {"train.distributed": True, "train.batch_size": 128, "scheduler.type": "cosine"}),
    ("multi_gpu", "wrn_28_10_ricap_8gpus", "cifar/wrn.yaml", """
        train.distributed True
        train.base_lr 0.2
        train.batch_size 64
        scheduler.epochs 200
        scheduler.type cosine
        train.output_dir experiments/wrn_28_10_ricap_8gpus/exp00
        augmentation.use_ricap True
        augmentation.use_random_crop False""",
     {"train.distributed": True, "train.batch_size": 64, "train.base_lr": 0.2}),
]

# Experiments on residual units, learning rate scheduling and data augmentation (ResNet-preact-56)
_RESIDUAL = [
    # (id, preact_stage text, remove_first_relu, add_last_bn, extra line)
    ("resnet_preact_after_downsampling", "' [True, True, True] '", False, False, ""),
    ("resnet_preact_w_relu_wo_bn", "' [True, False, False] '", False, False, ""),
    ("resnet_preact_wo_relu_wo_bn", "' [True, False, False] '", True, False, ""),
    ("resnet_preact_w_relu_w_bn", "' [True, False, False] '", False, True, ""),
    ("resnet_preact_wo_relu_w_bn", "' [True, False, False] '", True, True, ""),
    ("resnet_preact_after_downsampling_wo_relu_w_bn", "' [True, True, True] '", True, True, ""),
    ("resnet_preact_wo_relu_w_bn_cosine", "' [True, False, False] '", True, True, "scheduler.type cosine"),
    ("resnet_preact_wo_relu_w_bn_cutout", "' [True, False, False] '", True, True, "augmentation.use_cutout True"),
    ("resnet_preact_wo_relu_w_bn_random_erasing", "' [True, False, False] '", True, True,
     "augmentation.use_random_erasing True"),
    ("resnet_preact_wo_relu_w_bn_mixup", "' [True, False, False] '", True, True, "augmentation.use_mixup True"),
]
for _id, _stage, _relu, _bn, _extra in _RESIDUAL:
    _text = f"""
        train.base_lr 0.2
        model.resnet_preact.depth 56
        model.resnet_preact.preact_stage {_stage}
        model.resnet_preact.remove_first_relu {_relu}
        model.resnet_preact.add_last_bn {_bn}
        {_extra}
        train.output_dir experiments/{_id}/exp00"""
    _expect = {"train.base_lr": 0.2, "model.resnet_preact.depth": 56,
               "model.resnet_preact.preact_stage": [s == "True" for s in _stage.strip("' []").split(", ")],
               "model.resnet_preact.remove_first_relu": _relu, "model.resnet_preact.add_last_bn": _bn}
    if _extra:
        _expect[_extra.split()[0]] = True if _extra.split()[1] == "True" else _extra.split()[1]
    COMMANDS.append(("residual_units", _id, "cifar/resnet_preact.yaml", _text, _expect))

COMMANDS += [
    # LARS
    ("lars", "resnet_preact_lars", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 20
        train.optimizer lars
        train.base_lr 0.02
        train.batch_size 4096
        scheduler.type cosine
        train.output_dir experiments/resnet_preact_lars/exp00""",
     {"model.resnet_preact.depth": 20, "train.optimizer": "lars", "train.base_lr": 0.02,
      "train.batch_size": 4096, "scheduler.type": "cosine"}),
    # Ghost BN
    ("ghost_bn", "resnet_preact_ghost_batch", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 20
        train.base_lr 1.5
        train.batch_size 4096
        train.subdivision 32
        scheduler.type cosine
        train.output_dir experiments/resnet_preact_ghost_batch/exp00""",
     {"train.base_lr": 1.5, "train.batch_size": 4096, "train.subdivision": 32, "scheduler.type": "cosine"}),
    # No weight decay on BN
    ("no_wd_on_bn", "resnet_preact_no_weight_decay_on_bn", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 20
        train.base_lr 1.6
        train.batch_size 4096
        train.no_weight_decay_on_bn True
        train.weight_decay 5e-4
        scheduler.type cosine
        train.output_dir experiments/resnet_preact_no_weight_decay_on_bn/exp00""",
     {"train.no_weight_decay_on_bn": True, "train.weight_decay": 5e-4, "train.base_lr": 1.6,
      "train.batch_size": 4096}),
    # FP16 / mixed precision (apex opt levels)
    ("fp16", "resnet_preact_fp16", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 20
        train.base_lr 1.6
        train.batch_size 4096
        train.precision O3
        scheduler.type cosine
        train.output_dir experiments/resnet_preact_fp16/exp00""",
     {"train.precision": "fp16", "train.batch_size": 4096, "train.base_lr": 1.6}),
    ("fp16", "resnet_preact_mixed_precision", "cifar/resnet_preact.yaml", """
        model.resnet_preact.depth 20
        train.base_lr 1.6
        train.batch_size 4096
        train.precision O1
        scheduler.type cosine
        train.output_dir experiments/resnet_preact_mixed_precision/exp00""",
     {"train.precision": "amp", "train.batch_size": 4096, "scheduler.type": "cosine"}),
]

SECTION_COUNTS = {"usage": 1, "cifar10": 13, "long_training": 2, "multi_gpu": 4, "residual_units": 10,
                  "lars": 1, "ghost_bn": 1, "no_wd_on_bn": 1, "fp16": 2}
IDS = [c[1] for c in COMMANDS]


def readme_args(text: str) -> list[str]:
    return shlex.split(text)


def needs_cuda(cfg: C.Config) -> bool:
    """Pure fp16 (apex O3) trains on CUDA only; AMP (O1/O2: fp16 autocast + GradScaler) runs on CPU."""
    return C.precision(cfg) == "fp16"


def test_transcription_is_complete():
    counts: dict[str, int] = {}
    for section, *_ in COMMANDS:
        counts[section] = counts.get(section, 0) + 1
    assert counts == SECTION_COUNTS
    assert len(set(IDS)) == len(IDS) == 35


@pytest.mark.parametrize("section,cid,recipe,text,expect", COMMANDS, ids=IDS)
def test_readme_command_parses(section, cid, recipe, text, expect):
    args = readme_args(text)
    cfg = C.build(RECIPES / recipe, C.parse_overrides(args))
    for key, value in expect.items():
        got = C.get_key(cfg, key)
        assert got == value and type(got) is type(value), (key, got, value)
    # Every key the command sets resolves to exactly what it says (the output dir a path string).
    for key, raw in zip(args[::2], args[1::2]):
        got = C.get_key(cfg, key)
        want = float(raw) if isinstance(got, float) else C.PRECISION_ALIASES.get(raw, C.parse_scalar(raw))
        assert got == want, (key, got, raw)


# --------------------------------------------------------------------------- running them, shrunk
def speed_args(cfg: C.Config) -> list[str]:
    """Shrink the command's model to a few hundred parameters per layer; one epoch. At the
    README's 4096-image batches a step costs seconds on one thread even so: width 1 there."""
    name = cfg.model.name
    m = getattr(cfg.model, name)
    bottleneck = getattr(m, "block_type", "basic") == "bottleneck"
    width = 1 if cfg.train.batch_size >= 1024 else 4
    shrink = {
        "vgg": {"n_channels": "[4, 4, 4, 4, 4]", "n_layers": "[1, 1, 1, 1, 1]"},
        "resnet": {"depth": 11 if bottleneck else 8, "initial_channels": 4},
        "resnet_preact": {"depth": 11 if bottleneck else 8, "initial_channels": width},
        "wrn": {"depth": 10, "widening_factor": 1, "initial_channels": 4},
        "densenet": {"depth": 10 if bottleneck else 7, "growth_rate": 4},
        "pyramidnet": {"depth": 11 if bottleneck else 8, "alpha": 8, "initial_channels": 4},
        "resnext": {"depth": 11, "cardinality": 2, "base_channels": 2, "initial_channels": 4},
        "shake_shake": {"depth": 8, "initial_channels": 4},
    }[name]
    out = []
    for k, v in shrink.items():
        out += [f"model.{name}.{k}", str(v)]
    return out + ["scheduler.epochs", "1"]


def write_cifar_cache(cache_dir, n_train: int, n_test: int = 64) -> None:
    from imgclf.data.datasets import Data, _write_cache

    g = torch.Generator().manual_seed(0)
    data = Data("CIFAR10",
                torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.arange(n_train) % 10,
                torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.arange(n_test) % 10,
                [str(i) for i in range(10)], [0.5, 0.5, 0.5], [0.29, 0.29, 0.29])
    _write_cache(cache_dir / "cifar10.pt", data, "builtin")


def read_log(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cifar_env(tmp_path, monkeypatch):
    """A per-test cache dir (synthetic CIFAR-10 written by the test), a data root that does not
    exist, and a scratch working directory (a README ``train.output_dir`` must not be used)."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("IMGCLF_DATA_ROOT", str(tmp_path / "no-data"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


@pytest.mark.parametrize("section,cid,recipe,text,expect", COMMANDS, ids=IDS)
def test_readme_command_runs(section, cid, recipe, text, expect, cifar_env, capsys):
    args = readme_args(text)
    cfg = C.build(RECIPES / recipe, C.parse_overrides(args))
    batch = cfg.train.batch_size
    write_cifar_cache(cifar_env / "cache", 2 * batch)
    out = cifar_env / "run"
    argv = ["train", "--config", str(RECIPES / recipe), "--output-dir", str(out), "--quiet", *args,
            *speed_args(cfg)]
    if needs_cuda(cfg) and not CUDA:
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 2
        assert err.count("\n") == 1 and "needs a CUDA device" in err, err
        assert not out.exists() and not (cifar_env / "work" / "experiments").exists()
        pytest.skip("pure fp16 (apex O3) needs CUDA: only its one-line refusal on CPU was checked")
    rc = cli.main(argv)
    assert rc == 0, capsys.readouterr().err
    assert not (cifar_env / "work" / "experiments").exists()  # --output-dir wins over train.output_dir
    result = json.loads((out / "result.json").read_text())
    rows = read_log(out)
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(result["train_loss"])
    # Scored on the whole synthetic test set (64 images): the error is a whole number of images.
    assert result["test_error"] * 64 / 100 == pytest.approx(round(result["test_error"] * 64 / 100), abs=1e-6)
    resolved = C.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    assert resolved.train.batch_size == batch and resolved.train.subdivision == cfg.train.subdivision
    assert C.precision(resolved) == C.precision(cfg)
    assert resolved.augmentation == cfg.augmentation and resolved.train.optimizer == cfg.train.optimizer


# --------------------------------------------------------------------------- features on the real digits
DIGIT_RUNS = {
    # The README's augmentation switches (cutout's mask must fit the 8x8 digits).
    "cutout": "augmentation.use_cutout True augmentation.cutout.mask_size 4",
    "random_erasing": "augmentation.use_random_erasing True",
    "mixup": "augmentation.use_mixup True",
    "cutmix": "augmentation.use_cutmix True",
    "ricap": "augmentation.use_ricap True augmentation.use_random_crop False",
    "dual_cutout": "augmentation.use_dual_cutout True augmentation.cutout.mask_size 4",
    "label_smoothing": "augmentation.use_label_smoothing True",
    "cutout+mixup": "augmentation.use_cutout True augmentation.cutout.mask_size 4 augmentation.use_mixup True",
    # Optimizers.
    "sgd": "train.optimizer sgd",
    "adam": "train.optimizer adam train.base_lr 0.01",
    "amsgrad": "train.optimizer amsgrad train.base_lr 0.01",
    "lars": "train.optimizer lars train.base_lr 0.02",
    # Training options.
    "no_weight_decay_on_bn": "train.no_weight_decay_on_bn True",
    "subdivision": "train.subdivision 2",
    "gradient_clip": "train.gradient_clip 1.0",
    "bf16": "train.precision bf16",
    # Schedules, each after a warmup.
    # Schedules, each after a one-epoch warmup (3 epochs: warmup, then room for a milestone or
    # an SGDR restart; milestones and T0 count from the warmup's end).
    "constant+warmup": "scheduler.type constant scheduler.warmup.type linear scheduler.warmup.epochs 1",
    "multistep+warmup": "scheduler.type multistep scheduler.milestones [1] scheduler.warmup.type linear "
                        "scheduler.warmup.epochs 1",
    "linear+warmup": "scheduler.type linear scheduler.warmup.type exponential scheduler.warmup.epochs 1",
    "cosine+warmup": "scheduler.type cosine scheduler.warmup.type linear scheduler.warmup.epochs 1",
    "sgdr+warmup": "scheduler.type sgdr scheduler.T0 1 scheduler.warmup.type linear scheduler.warmup.epochs 1",
}
# The lr logged after each epoch of the schedule runs (base_lr 0.1, the digits recipe's lr_min_factor 0).
# As in the reference, a milestone or an SGDR restart at the end of an epoch takes effect one step
# later, on the next epoch's first step: the lr logged at that epoch's end is still the old one.
SCHEDULE_LRS = {"constant+warmup": [0.1, 0.1, 0.1], "multistep+warmup": [0.1, 0.1, 0.01],
                "linear+warmup": [0.1, 0.05, 0.0], "cosine+warmup": [0.1, 0.05, 0.0],
                "sgdr+warmup": [0.1, 0.0, 0.0]}
DIGIT_EPOCHS = 2
# TINY (tests/conftest.py) at batch 64: 21 steps an epoch.
DIGIT_BATCH = 64


def tiny_args(**extra) -> list[str]:
    out = []
    for k, v in {**TINY, "scheduler.epochs": DIGIT_EPOCHS, "train.batch_size": DIGIT_BATCH, **extra}.items():
        out += [k, str(v)]
    return out


@pytest.fixture(scope="module")
def digit_baseline(tmp_path_factory):
    """The digits run without any feature switch, by number of epochs: {epochs: final weights}."""
    cache: dict[int, dict] = {}

    def weights(epochs: int) -> dict:
        if epochs not in cache:
            out = tmp_path_factory.mktemp("baseline") / "run"
            rc = cli.main(["train", "--config", str(DIGITS), "--output-dir", str(out), "--quiet",
                           *tiny_args(**{"scheduler.epochs": epochs})])
            assert rc == 0
            cache[epochs] = torch.load(out / "model.pt", weights_only=True)
        return cache[epochs]

    return weights


@pytest.mark.parametrize("what", list(DIGIT_RUNS), ids=list(DIGIT_RUNS))
def test_feature_trains_on_digits(what, tmp_path, capsys, digit_baseline):
    """Through the CLI, each switch reaches the engine: the run ends with other weights than the
    same run without it (train.optimizer sgd is the default: the very same weights), and still
    learns. What each switch computes is tested by its effect in tests/test_engine_switches.py."""
    feature = shlex.split(DIGIT_RUNS[what])
    out = tmp_path / "run"
    epochs = len(SCHEDULE_LRS.get(what, [None] * DIGIT_EPOCHS))
    rc = cli.main(["train", "--config", str(DIGITS), "--output-dir", str(out), "--quiet",
                   *tiny_args(**{"scheduler.epochs": epochs}), *feature])
    assert rc == 0, capsys.readouterr().err
    ours, base = torch.load(out / "model.pt", weights_only=True), digit_baseline(epochs)
    same = all(torch.equal(ours[k], base[k]) for k in base)
    assert same == (what == "sgd"), what
    rows = read_log(out)
    assert len(rows) == epochs
    if what in SCHEDULE_LRS:
        assert [float(r["lr"]) for r in rows] == pytest.approx(SCHEDULE_LRS[what], abs=1e-9)
    losses = [float(r["train_loss"]) for r in rows]
    assert all(math.isfinite(x) for x in losses), losses
    result = json.loads((out / "result.json").read_text())
    assert result["test_error"] < 50, (what, result["test_error"])  # chance is 90 %


# --------------------------------------------------------------------------- subdivision without BN
def test_subdivision_equals_whole_batch_without_bn(tmp_path, capsys):
    """Without BatchNorm, train.subdivision 4 (four chunks of 16, gradients accumulated) computes
    the same update as one whole batch of 64: same weights after an epoch (21 steps), same
    logged training loss and error."""
    runs = {}
    for sub in (1, 4):
        out = tmp_path / f"sub{sub}"
        rc = cli.main(["train", "--config", str(DIGITS), "--output-dir", str(out), "--quiet",
                       *tiny_args(**{"scheduler.epochs": 1}),
                       "model.name", "vgg", "model.vgg.use_bn", "False", "model.vgg.n_channels", "[8, 16]",
                       "model.vgg.n_layers", "[1, 1]", "train.subdivision", str(sub),
                       "device", "cpu"])  # fp32 math on any machine (CUDA convs may use TF32)
        assert rc == 0, capsys.readouterr().err
        runs[sub] = (torch.load(out / "model.pt", weights_only=True), read_log(out)[0])
    (w1, log1), (w4, log4) = runs[1], runs[4]
    assert not any("running_mean" in k for k in w1)  # really no BN
    assert w1.keys() == w4.keys()
    for k in w1:
        torch.testing.assert_close(w4[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    assert float(log4["train_loss"]) == pytest.approx(float(log1["train_loss"]), rel=1e-5)
    assert float(log4["train_error"]) == pytest.approx(float(log1["train_error"]))
