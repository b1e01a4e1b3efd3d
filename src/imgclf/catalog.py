"""The catalog: one entry per model family and per dataset, holding the facts everyone reads.

A model family's entry holds its options (the dataclass that becomes ``config.model.<name>``),
its depth rule, the ranges of its numeric options, its block types and the module that
registers its builder. A dataset's entry holds its image shape, classes, official split sizes,
normalization constants, reader, folder and published checksums.

The config schema and its checks, the model registry, the CLI, the readers and the planner read
these entries; nothing else states these facts. This module never imports torch: planning a
workflow reads it for hundreds of rows.

Adding a model family: its module under ``models/`` (a builder decorated with
``models.register(name)``), an entry in :data:`MODELS` and a recipe. Adding a dataset: an entry
in :data:`DATASETS` (and a reader, when none of the existing ones reads its files).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from imgclf.utils import clip

# (low, high, low inclusive, high inclusive) of a number; None = unbounded on that side.
Range = tuple[float | None, float | None, bool, bool]
POSITIVE: Range = (0, None, False, True)
NON_NEGATIVE: Range = (0, None, True, True)
DROP_RATE: Range = (0, 1, True, False)
COMPRESSION_RATE: Range = (0, 1, False, True)


# --------------------------------------------------------------------------- model families
@dataclass
class VGGConfig:
    n_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    n_layers: list[int] = field(default_factory=lambda: [2, 2, 3, 3])
    use_bn: bool = True


@dataclass
class ResNetConfig:
    depth: int = 110
    n_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # ImageNet-style, unused for CIFAR
    block_type: str = "basic"
    initial_channels: int = 16


@dataclass
class ResNetPreActConfig:
    depth: int = 110
    n_blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    block_type: str = "basic"
    initial_channels: int = 16
    remove_first_relu: bool = False
    add_last_bn: bool = False
    preact_stage: list[bool] = field(default_factory=lambda: [True, True, True])


@dataclass
class SEResNetPreActConfig:
    depth: int = 110
    initial_channels: int = 16
    se_reduction: int = 16
    block_type: str = "basic"
    remove_first_relu: bool = False
    add_last_bn: bool = False
    preact_stage: list[bool] = field(default_factory=lambda: [True, True, True])


@dataclass
class WRNConfig:
    depth: int = 28
    initial_channels: int = 16
    widening_factor: int = 10
    drop_rate: float = 0.0


@dataclass
class DenseNetConfig:
    depth: int = 100
    n_blocks: list[int] = field(default_factory=lambda: [6, 12, 24, 16])
    block_type: str = "bottleneck"
    growth_rate: int = 12
    drop_rate: float = 0.0
    compression_rate: float = 0.5


@dataclass
class PyramidNetConfig:
    depth: int = 272
    n_blocks: list[int] = field(default_factory=lambda: [3, 24, 36, 3])
    initial_channels: int = 16
    block_type: str = "bottleneck"
    alpha: int = 200


@dataclass
class ResNeXtConfig:
    depth: int = 29
    n_blocks: list[int] = field(default_factory=lambda: [3, 4, 6, 3])
    initial_channels: int = 64
    cardinality: int = 8
    base_channels: int = 64


@dataclass
class ShakeShakeConfig:
    depth: int = 26
    initial_channels: int = 96
    shake_forward: bool = True
    shake_backward: bool = True
    shake_image: bool = True


def _check_vgg(v: VGGConfig) -> str | None:
    if not v.n_channels or len(v.n_channels) != len(v.n_layers):
        return (f"model.vgg.n_layers: expected one entry per stage of model.vgg.n_channels "
                f"({len(v.n_channels)}), got {clip(v.n_layers)}")
    if min(v.n_layers) < 1 or min(v.n_channels) < 1:
        return (f"model.vgg: every stage needs >= 1 layer and >= 1 channel, got n_channels "
                f"{clip(v.n_channels)}, n_layers {clip(v.n_layers)}")
    return None


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the reference README's model.name
    options: type  # a dataclass: the keys and defaults of config.model.<name>
    module: str  # importing it registers the builder (models.register(name))
    # depth = a * n + b with n >= 1, per block type ("" = whatever the block type): what the builder
    # accepts, known at resolution so a row with an impossible depth fails `snakemake -n`, not its job
    depth_rules: dict[str, tuple[int, int]] = field(default_factory=dict)
    block_types: tuple[str, ...] = ()  # the choices of model.<name>.block_type
    ranges: dict[str, Range] = field(default_factory=dict)  # numeric options, checked in this order
    check: Callable[[Any], str | None] | None = None  # other rules: the options -> an error line or None
    init_mode: str | None = None  # a weight init this family always uses, whatever model.init_mode says
    # Run ids hash every one of these families' options, selected or not: that is how the ids of
    # every planned row were made, so it stays. Other families' options enter a run id only where
    # the family is the selected model.
    in_every_run_id: bool = False


_BLOCKS = ("basic", "bottleneck")
_RESNET_DEPTHS = {"basic": (6, 2), "bottleneck": (9, 2)}

MODELS: dict[str, ModelFamily] = {f.name: f for f in (
    ModelFamily("vgg", VGGConfig, "imgclf.models.vgg", check=_check_vgg, in_every_run_id=True),
    ModelFamily("resnet", ResNetConfig, "imgclf.models.resnet", _RESNET_DEPTHS, _BLOCKS,
                {"initial_channels": POSITIVE, "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("resnet_preact", ResNetPreActConfig, "imgclf.models.resnet_preact", _RESNET_DEPTHS, _BLOCKS,
                {"initial_channels": POSITIVE, "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("se_resnet_preact", SEResNetPreActConfig, "imgclf.models.se_resnet_preact", _RESNET_DEPTHS,
                _BLOCKS, {"initial_channels": POSITIVE, "se_reduction": POSITIVE, "depth": POSITIVE},
                # the reference's SE network has its own initializer: fan_out, whatever model.init_mode says
                init_mode="kaiming_fan_out", in_every_run_id=True),
    ModelFamily("wrn", WRNConfig, "imgclf.models.wrn", {"": (6, 4)}, (),
                {"initial_channels": POSITIVE, "widening_factor": POSITIVE, "drop_rate": DROP_RATE,
                 "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("densenet", DenseNetConfig, "imgclf.models.densenet", {"basic": (3, 4), "bottleneck": (6, 4)},
                _BLOCKS, {"growth_rate": POSITIVE, "drop_rate": DROP_RATE, "compression_rate": COMPRESSION_RATE,
                          "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("pyramidnet", PyramidNetConfig, "imgclf.models.pyramidnet", _RESNET_DEPTHS, _BLOCKS,
                {"initial_channels": POSITIVE, "alpha": NON_NEGATIVE, "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("resnext", ResNeXtConfig, "imgclf.models.resnext", {"": (9, 2)}, (),
                {"initial_channels": POSITIVE, "cardinality": POSITIVE, "base_channels": POSITIVE,
                 "depth": POSITIVE}, in_every_run_id=True),
    ModelFamily("shake_shake", ShakeShakeConfig, "imgclf.models.shake_shake", {"": (6, 2)}, (),
                {"initial_channels": POSITIVE, "depth": POSITIVE}, in_every_run_id=True),
)}


def model_names() -> tuple[str, ...]:
    return tuple(sorted(MODELS))


# --------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class Dataset:
    name: str  # the reference README's dataset.name
    shape: tuple[int, int, int]  # (channels, height, width) of every image
    n_classes: int
    # The official split sizes: a reader refuses files of other sizes, and a batch larger than the
    # training split is refused before any job starts. A dict, so a test can shrink it.
    split_sizes: dict[str, int]
    reader: str  # data.readers.read_<reader>
    folder: str = ""  # under the data root; "" = bundled with a library
    classes: tuple[str, ...] = ()  # class names where the files do not carry them
    # The reference's normalization constants (its transforms' _get_dataset_stats), which the
    # tables' runs normalize with; None = the statistics measured on the training images.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # Published MD5s by file stem: of the decompressed files (md5), else of the released .gz files
    # (gz_md5, for a dataset whose decompressed checksums were never published).
    md5: dict[str, str] = field(default_factory=dict)
    gz_md5: dict[str, str] = field(default_factory=dict)
    archive_folder: str = ""  # the folder the official archive unpacks to (CIFAR's python batches)
    torchvision: str = ""  # torchvision.datasets class that downloads the official release
    aliases: tuple[str, ...] = ()  # other spellings `imgclf data` accepts (lower case)


_IDX = {"train": 60000, "test": 10000}
_CIFAR = {"train": 50000, "test": 10000}

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    # scikit-learn's 1,797 8x8 digits in a fixed stratified 75/25 split
    Dataset("digits", (1, 8, 8), 10, {"train": 1347, "test": 450}, "digits",
            classes=tuple(str(i) for i in range(10))),
    Dataset("MNIST", (1, 28, 28), 10, dict(_IDX), "idx", "mnist", tuple(str(i) for i in range(10)),
            ((0.1307,), (0.3081,)), md5={
                "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"},
            torchvision="MNIST"),
    Dataset("FashionMNIST", (1, 28, 28), 10, dict(_IDX), "idx", "fashion_mnist",
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            ((0.2860,), (0.3530,)), md5={
                "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965"},
            torchvision="FashionMNIST", aliases=("fashion_mnist", "fashion-mnist")),
    Dataset("KMNIST", (1, 28, 28), 10, dict(_IDX), "idx", "kmnist",
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            ((0.1904,), (0.3475,)), gz_md5={  # torchvision's download list
                "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
                "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
                "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
                "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134"},
            torchvision="KMNIST"),
    Dataset("CIFAR10", (3, 32, 32), 10, dict(_CIFAR), "cifar", "cifar10",
            normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            archive_folder="cifar-10-batches-py", torchvision="CIFAR10"),
    Dataset("CIFAR100", (3, 32, 32), 100, dict(_CIFAR), "cifar", "cifar100",
            normalization=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
            archive_folder="cifar-100-python", torchvision="CIFAR100"),
)}


def dataset_names() -> tuple[str, ...]:
    return tuple(DATASETS)
