"""Typed configuration: dataclass schema, YAML recipes, ``KEY VALUE`` overrides.

Key names are the reference README's (``train.base_lr``, ``model.resnet_preact.depth``,
``augmentation.use_cutout`` ...), so its commands run unchanged. Every value is
checked against the schema's type; unknown keys name the closest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgclf import catalog
from imgclf.utils import InputError, clip, os_form, parse_yaml, read_yaml, shown, text_form


class ConfigError(ValueError):
    """A bad recipe, override or value; the message is one line naming it."""


# --------------------------------------------------------------------------- schema
@dataclass
class DatasetConfig:
    name: str = "CIFAR10"  # a dataset of the catalog (imgclf.catalog.DATASETS)
    dataset_dir: str = ""  # explicit folder; empty = <data_root>/<dataset>
    image_size: int = 0  # 0 = the dataset's own size
    n_channels: int = 0  # 0 = the dataset's own
    n_classes: int = 0  # 0 = the dataset's own


def _model_section_class(families: tuple[catalog.ModelFamily, ...]) -> type:
    """``config.model``: the keys every family shares, then one section per catalog family
    (``model.<family>.<option>``), in the catalog's order."""
    cls = dataclasses.make_dataclass("ModelConfig", [
        ("type", str, field(default="cifar")),
        ("name", str, field(default="resnet_preact")),
        ("init_mode", str, field(default="kaiming_fan_out")),
        *((f.name, f.options, field(default_factory=f.options)) for f in families)])
    cls.__module__ = __name__  # pickled by name: the current section of this module
    return cls


_MODEL_FAMILIES = tuple(catalog.MODELS.values())
ModelConfig = _model_section_class(_MODEL_FAMILIES)


def model_section() -> type:
    """The dataclass of ``config.model`` for the catalog's families as they are now: a family
    added to the catalog (a test's toy family) gets its section, and its keys, on the next config."""
    global ModelConfig, _MODEL_FAMILIES
    families = tuple(catalog.MODELS.values())
    if families != _MODEL_FAMILIES:
        ModelConfig, _MODEL_FAMILIES = _model_section_class(families), families
        for cache in (_hints, _field_kinds, _field_names, _non_semantic_keys):
            cache.cache_clear()
    return ModelConfig


@dataclass
class DistConfig:
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    init_method: str = "env://"
    world_size: int = -1  # kept for the reference README's configs; env:// decides
    node_rank: int = -1
    local_rank: int = 0
    use_sync_bn: bool = False
    # The reference's torch.distributed.launch runs, reproduced by the rows that ran them:
    # False = one sample order for every epoch (its DistributedSampler never had set_epoch called)
    reshuffle_every_epoch: bool = True
    # True = each rank mixes (mixup | cutmix | ricap) only its own shard, with the same draws on
    # every rank (its collator ran per process from identically seeded RNGs); False = one mix of
    # the global batch, so N ranks compute what one process does
    mixer_per_rank: bool = False
    # True = each rank augments only its own shard (crop, flip, Cutout, random erasing), drawing from
    # the step's generator as one process does for its whole batch, so every rank draws the same
    # parameters for the same position in its shard (the reference's DataLoader workers were seeded
    # alike on every rank); False = the global batch is augmented once and sharded, so N ranks
    # compute what one process does
    augment_per_rank: bool = False


@dataclass
class DataLoaderConfig:
    # The reference README's DataLoader knobs; data lives on the device here, so
    # only drop_last has an effect. The others are accepted for compatibility.
    num_workers: int = 2
    drop_last: bool = True
    pin_memory: bool = False
    non_blocking: bool = False


@dataclass
class TrainConfig:
    checkpoint: str = ""
    resume: bool = False
    use_apex: bool = False  # accepted for compatibility; precision decides
    precision: str = "fp32"  # fp32 (IEEE) | tf32 | amp | bf16 | fp16 | O0 | O1 | O2 | O3
    batch_size: int = 128
    subdivision: int = 1
    optimizer: str = "sgd"  # sgd | adam | amsgrad | lars
    base_lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    no_weight_decay_on_bn: bool = False
    gradient_clip: float = 0.0
    start_epoch: int = 0
    seed: int = 0
    val_first: bool = False
    val_period: int = 1  # evaluate every this many epochs (and at the last); alias train.eval_period
    val_ratio: float = 0.0
    use_test_as_val: bool = True
    output_dir: str = ""
    log_period: int = 100
    checkpoint_period: int = 1  # checkpoint every this many epochs (and at the last)
    use_tensorboard: bool = False
    channels_last: bool = True
    compile: bool = False
    # Deterministic kernels, cuDNN autotuning off: bit-exact resume on CUDA, at a speed cost.
    # Off, CUDA runs let cuDNN pick its fastest (nondeterministic) algorithms. CPU runs are
    # deterministic either way.
    deterministic: bool = False
    # The GPU speed path (bit-identical to the plain path on CPU, so not part of the run id):
    # epoch_augmentation makes every step's augmented, normalized batch of an epoch at the epoch's
    # start (the same per-(seed, epoch, step) draws as the per-step path) into a resident buffer in
    # the autocast dtype (fp16 / bf16) or the model's (channels_last where the model uses it); the
    # steps only index it.
    # Above epoch_augmentation_max_gb it falls back to per-step augmentation, with a log line.
    epoch_augmentation: bool = False
    epoch_augmentation_max_gb: float = 4.0
    # epoch_augmentation_draws: per_step (the above: one transform call per step) | batched: the
    # per-sample transforms (crop, flip, normalize, cutout, random erasing) run over chunks of
    # BATCHED_CHUNK_SAMPLES samples of the epoch in one call each, from one generator per chunk
    # seeded by (seed, epoch, chunk); the mixers stay per step. The same distributions, other
    # draws: batched is part of the run id. Above the memory budget it makes one chunk at a time
    # (the same numbers).
    epoch_augmentation_draws: str = "per_step"
    # capturable_step: removed; only its default False is accepted, so the resolved config.yaml of
    # every existing run directory still loads (see CAPTURABLE_STEP_REMOVED). train.compile is the
    # supported compile path.
    capturable_step: bool = False
    on_divergence: str = "stop"  # stop | rollback (to the last checkpoint, with a lower lr)
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    distributed: bool = False
    # torch's CPU threads on a CPU device: part of the run's identity, because the blocking of
    # CPU convolutions and reductions (and so the last bits of every step) follows the thread
    # count; the cores a job is given never change the numbers. No effect on a GPU's numerics.
    threads: int = 1
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass
class AdamConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LARSConfig:
    eps: float = 1e-9
    threshold: float = 1e-2


@dataclass
class OptimConfig:
    adam: AdamConfig = field(default_factory=AdamConfig)
    lars: LARSConfig = field(default_factory=LARSConfig)


@dataclass
class WarmupConfig:
    type: str = "none"  # none | linear | exponential
    epochs: int = 0
    start_factor: float = 1e-3
    exponent: float = 4.0


@dataclass
class SchedulerConfig:
    epochs: int = 160
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    type: str = "multistep"  # constant | multistep | linear | cosine | sgdr
    milestones: list[int] = field(default_factory=lambda: [80, 120])
    lr_decay: float = 0.1
    lr_min_factor: float = 0.001
    T0: int = 10
    T_mul: float = 1.0
    # True = optimizer step s runs at the lr of step s + 1 (the 2019 train.py stepped its scheduler
    # before each update: a multistep milestone lowers the lr from the first step of its epoch, and
    # the last step reaches the cosine's floor); False = the later code's (step s at step s's lr)
    step_before_update: bool = False


@dataclass
class ValidationConfig:
    batch_size: int = 1024
    dataloader: DataLoaderConfig = field(default_factory=lambda: DataLoaderConfig(drop_last=False))


@dataclass
class RandomCropConfig:
    padding: int = 4
    fill: int = 0
    padding_mode: str = "constant"


@dataclass
class FlipConfig:
    prob: float = 0.5


@dataclass
class CutoutConfig:
    prob: float = 1.0
    mask_size: int = 16
    cut_inside: bool = False
    mask_color: int = 0
    dual_cutout_alpha: float = 0.1


@dataclass
class RandomErasingConfig:
    prob: float = 0.5
    area_ratio_range: list[float] = field(default_factory=lambda: [0.02, 0.4])
    min_aspect_ratio: float = 0.3
    max_attempt: int = 20


@dataclass
class MixupConfig:
    alpha: float = 1.0


@dataclass
class RICAPConfig:
    beta: float = 0.3
    # per_batch: one crop offset per region for the whole batch (the RICAP authors' code and the
    # reference's collator); per_sample: one per sample and region (same distribution per sample)
    offsets: str = "per_batch"


@dataclass
class CutMixConfig:
    alpha: float = 1.0


@dataclass
class LabelSmoothingConfig:
    epsilon: float = 0.1


@dataclass
class AugmentationConfig:
    use_random_crop: bool = True
    use_random_horizontal_flip: bool = True
    use_cutout: bool = False
    use_random_erasing: bool = False
    use_dual_cutout: bool = False
    use_mixup: bool = False
    use_ricap: bool = False
    use_cutmix: bool = False
    use_label_smoothing: bool = False
    random_crop: RandomCropConfig = field(default_factory=RandomCropConfig)
    random_horizontal_flip: FlipConfig = field(default_factory=FlipConfig)
    cutout: CutoutConfig = field(default_factory=CutoutConfig)
    random_erasing: RandomErasingConfig = field(default_factory=RandomErasingConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ricap: RICAPConfig = field(default_factory=RICAPConfig)
    cutmix: CutMixConfig = field(default_factory=CutMixConfig)
    label_smoothing: LabelSmoothingConfig = field(default_factory=LabelSmoothingConfig)


@dataclass
class Config:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data_root: str = ""  # empty = $IMGCLF_DATA_ROOT, else ./resources/data
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=lambda: model_section()())
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _as_dict(node: Any) -> dict[str, Any]:
    """dataclasses.asdict for this schema (dataclasses, scalars, lists of scalars), 10x faster:
    planning converts every row's config."""
    out = {}
    for name, nested in _field_kinds(type(node)):
        value = getattr(node, name)
        if nested:
            out[name] = _as_dict(value)
        elif type(value) is list:
            out[name] = list(value)
        else:
            out[name] = value
    return out


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, is a nested section) in declaration order."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, dataclasses.is_dataclass(hints[f.name])) for f in dataclasses.fields(cls))


PRECISION_ALIASES = {"O0": "fp32", "O1": "amp", "O2": "fp16_master", "O3": "fp16"}
# Other spellings of a key, read into the one field they name (one value, no second source of
# truth). train.eval_period is another name for the reference's train.val_period.
KEY_ALIASES = {"train.eval_period": "train.val_period"}
PRECISIONS = ("fp32", "tf32", "amp", "bf16", "fp16", "fp16_master")
# The most optimizer steps a run may take (scheduler.epochs x steps per epoch): about 30 years at
# 1,000 steps/s, so never a real run; it keeps a typo such as 10^8 epochs from being planned.
MAX_TOTAL_STEPS = 10**9
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Every int is read into a C integer somewhere (torch seeds are int64, shapes int32): bounded
# here, at resolution, not by an overflow deep inside a job.
INT_LIMIT = 2**32 - 1
MAX_OVERRIDE_CHARS = 10_000
FLOAT_LIMIT = 1e9
# (low, high, low inclusive, high inclusive) of numeric keys beyond "a number"; the rest of
# validate() checks combinations. None = unbounded on that side.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "train.seed": (0, INT_LIMIT, True, True),
    "train.batch_size": (0, None, False, True),
    "train.subdivision": (0, None, False, True),
    "train.base_lr": (0, None, False, True),  # at most FLOAT_LIMIT: 1e308 only overflows; 1e6 diverges cleanly
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": (0, 1, True, True),
    "train.gradient_clip": (0, None, True, True),
    "train.start_epoch": (0, None, True, True),
    "train.val_period": (0, None, False, True),
    "train.val_ratio": (0, 1, True, False),
    "train.log_period": (0, None, False, True),
    "train.checkpoint_period": (0, None, False, True),
    "train.epoch_augmentation_max_gb": (0, None, False, True),
    "train.threads": (0, 1024, False, True),
    "train.rollback_lr_factor": (0, 1, False, False),
    "train.max_rollbacks": (0, None, True, True),
    "train.dataloader.num_workers": (0, None, True, True),
    "validation.dataloader.num_workers": (0, None, True, True),
    "train.dist.world_size": (-1, None, True, True),
    "train.dist.node_rank": (-1, None, True, True),
    "train.dist.local_rank": (0, None, True, True),
    "validation.batch_size": (0, None, False, True),
    "scheduler.epochs": (0, None, False, True),
    "scheduler.lr_decay": (0, 1, False, True),
    "scheduler.lr_min_factor": (0, 1, True, True),
    "scheduler.T0": (0, None, False, True),
    "scheduler.T_mul": (1, None, True, True),
    "scheduler.warmup.epochs": (0, None, True, True),
    "scheduler.warmup.start_factor": (0, 1, False, True),
    "scheduler.warmup.exponent": (0, None, False, True),
    "optim.lars.eps": (0, None, False, True),
    "optim.lars.threshold": (0, None, True, True),
    "augmentation.random_crop.padding": (0, None, True, True),
    "augmentation.random_crop.fill": (0, 255, True, True),
    "augmentation.random_horizontal_flip.prob": (0, 1, True, True),
    "augmentation.cutout.prob": (0, 1, True, True),
    "augmentation.cutout.mask_size": (0, None, False, True),
    "augmentation.cutout.mask_color": (0, 255, True, True),
    "augmentation.cutout.dual_cutout_alpha": (0, None, True, True),
    "augmentation.random_erasing.prob": (0, 1, True, True),
    "augmentation.random_erasing.min_aspect_ratio": (0, 1, False, True),
    "augmentation.random_erasing.max_attempt": (0, None, False, True),
    "augmentation.mixup.alpha": (0, None, False, True),
    "augmentation.cutmix.alpha": (0, None, False, True),
    "augmentation.ricap.beta": (0, None, False, True),
    "augmentation.label_smoothing.epsilon": (0, 1, True, False),
}
MIXERS = ("use_mixup", "use_cutmix", "use_ricap")
# Choices of keys that are not the catalog's (dataset.name, model.<family>.block_type: see choices()).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.init_mode": ("kaiming_fan_out", "kaiming_fan_in"),
    "train.precision": PRECISIONS + tuple(PRECISION_ALIASES),
    "train.optimizer": ("sgd", "adam", "amsgrad", "lars"),
    "scheduler.type": ("constant", "multistep", "linear", "cosine", "sgdr"),
    "scheduler.warmup.type": ("none", "linear", "exponential"),
    "augmentation.random_crop.padding_mode": ("constant", "edge", "reflect"),
    "train.epoch_augmentation_draws": ("per_step", "batched"),
    "augmentation.ricap.offsets": ("per_batch", "per_sample"),
    "train.dist.backend": ("auto", "nccl", "gloo"),
    "train.on_divergence": ("stop", "rollback"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values: CHOICES, the catalog's dataset names and block types."""
    return {"dataset.name": catalog.dataset_names(), **CHOICES,
            **{f"model.{f.name}.block_type": f.block_types for f in catalog.MODELS.values() if f.block_types}}


# --------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema."""
    keys = []
    for name, hint in _hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, key + ".")
        else:
            keys.append(key)
    return keys


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5) if len(key) <= 200 else []
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}unknown config key '{shown(key) if len(key) <= 60 else clip(key, 60)}'{hint}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is not None:  # list[int], not 'list'
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# YAML 1.1 (PyYAML) reads '5e-4' and '1E-3' as strings; they are floats to every reader of a recipe.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check (and minimally widen) a value against its schema type."""
    origin = typing.get_origin(hint)
    bad = ConfigError(f"{where}{key}: expected {_type_name(hint)}, got {clip(value)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):  # a quoted list that reached us still quoted: '[True, False]'
            value = parse_scalar(value)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item, key, where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value  # bounded by validate(), on the resolved config: an override may fix a recipe
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)  # bounded by validate(), on the resolved config
        except OverflowError:  # an int beyond any float: validate() refuses the infinity
            return math.copysign(math.inf, value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise bad  # pragma: no cover - schema only uses the types above


def parse_scalar(text: str) -> Any:
    """A command-line value, read as YAML (``True``, ``0.2``, ``'[1, 2]'``, ``[80, 120]``)."""
    if not text.strip():
        return ""
    if len(text) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override value {clip(text)}: {len(text):,} characters, more than any config value "
                          f"needs (at most {MAX_OVERRIDE_CHARS:,})")
    try:
        # argv under a non-UTF-8 locale holds a path's bytes as surrogate escapes, which YAML refuses:
        # parsed as the characters they name, then held as argv would hold them (utils.text_form).
        return os_form(parse_yaml(text_form(text), "override value"))
    except InputError as e:
        if "alias" in str(e):
            raise ConfigError(f"override value {clip(text)}: {str(e).split(': ', 1)[1]}") from None
        return text


def set_key(cfg: Config, key: str, value: Any, where: str = "") -> None:
    key = KEY_ALIASES.get(key, key)
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in _field_names(type(node)):
            raise _unknown(key, where)
        hint = _hints(type(node))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}{key}: expected a mapping of sub-keys, got {clip(value)}")
                for k, v in value.items():
                    set_key(cfg, f"{key}.{k}", v, where)
                return
            setattr(node, part, _coerce(value, hint, key, where))
        else:
            node = getattr(node, part)


def get_key(cfg: Config, key: str) -> Any:
    key = KEY_ALIASES.get(key, key)
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise _unknown(key, "")
        node = getattr(node, part)
    return node


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``KEY VALUE KEY VALUE`` or ``KEY=VALUE`` (mixable) -> {key: value}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            raise ConfigError(f"'{arg}' after the KEY VALUE overrides: put options before them")
        if "=" in arg:
            key, text = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value; write KEY VALUE or KEY=VALUE")
            key, text = arg, args[i + 1]
            i += 2
        try:
            out[key] = parse_scalar(text)
        except ConfigError as e:  # an alias bomb or a megabyte value: say which override
            raise ConfigError(f"override {clip(key, 60)}: {e}") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{shown(path)}: file not found")
    st = path.stat()
    return copy.deepcopy(_load_yaml(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=256)
def _load_yaml(name: str, _mtime: int, _size: int) -> dict[str, Any]:
    """Parsed once per file version: planning reads each recipe for hundreds of rows."""
    path = Path(name)
    try:
        data = read_yaml(path, "a YAML mapping of config keys")
    except InputError as e:
        raise ConfigError(str(e)) from None
    if data is None:  # an empty recipe: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _recipe_items(recipe: str | Path) -> tuple[tuple[str, Any], ...]:
    """A recipe's flattened (key, value) pairs, parsed once per file version. Values are
    never mutated (set_key copies lists), so the cached pairs are shared safely."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"{shown(path)}: file not found")
    st = path.stat()
    return _recipe_items_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _recipe_items_cached(name: str, mtime: int, size: int) -> tuple[tuple[str, Any], ...]:
    return tuple(_flatten(_load_yaml(name, mtime, size)).items())


def build(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Schema defaults <- recipe file <- overrides, then validated."""
    cfg = Config()
    sources: dict[str, str] = {}  # dotted key (or section) -> where its value came from
    if recipe is not None:
        for key, value in _recipe_items(recipe):
            set_key(cfg, key, value, where=f"{recipe}: ")
            sources[KEY_ALIASES.get(str(key), str(key))] = f"{recipe}: "
    for key, value in (overrides or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"override {key!r}: a config key must be a string like 'train.base_lr'")
        set_key(cfg, key, value, where="override ")
        sources[KEY_ALIASES.get(key, key)] = "override "
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(_source(str(e), sources) + str(e)) from None
    return cfg


def _source(message: str, sources: dict[str, str]) -> str:
    """'<recipe>: ' or 'override ' for the key a validation message starts with, when known."""
    key = re.match(r"[\w.]+", message)
    if not key:
        return ""
    key = key.group(0)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # the key itself, else the section it was set through
        where = sources.get(".".join(parts[:n]))
        if where:
            return where
    return ""


def from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in _flatten(d).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def _not_one_of(key: str, value: Any, choices: tuple[str, ...]) -> ConfigError:
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lower), n=1, cutoff=0.4)
    hint = f" (did you mean '{lower[close[0]]}'?)" if close else ""
    text = shown(value) if len(str(value)) <= 40 else clip(str(value))
    return ConfigError(f"{key}: '{text}' is not one of {', '.join(choices)}{hint}")


def validate(cfg: Config) -> None:
    """Choices, ranges and combinations the type system cannot express. Normalizes aliases
    (apex's O0..O3) so equal computations hash equally."""
    for key, allowed in choices().items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise _not_one_of(key, value, allowed)
    cfg.train.precision = PRECISION_ALIASES.get(cfg.train.precision, cfg.train.precision)
    if cfg.model.name not in catalog.MODELS:
        raise _not_one_of("model.name", cfg.model.name, catalog.model_names())
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"device: '{cfg.device}' is not one of auto, cpu, cuda, cuda:N, mps")
    for key in ("dataset.image_size", "dataset.n_channels", "dataset.n_classes"):
        if get_key(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0 (0 = the dataset's own), got {get_key(cfg, key)}")
    _check_dataset_shape(cfg)
    if cfg.train.capturable_step:
        raise ConfigError(CAPTURABLE_STEP_REMOVED)
    if cfg.train.epoch_augmentation_draws == "batched" and not cfg.train.epoch_augmentation:
        raise ConfigError("train.epoch_augmentation_draws: batched needs train.epoch_augmentation True "
                          "(or per_step)")
    _check_limits(cfg)
    if cfg.train.dist.augment_per_rank and not cfg.train.dist.mixer_per_rank:
        raise ConfigError("train.dist.augment_per_rank: needs train.dist.mixer_per_rank True (a rank that "
                          "augments only its shard cannot mix the global batch)")
    if cfg.train.dist.augment_per_rank and cfg.train.epoch_augmentation_draws == "batched":
        raise ConfigError("train.dist.augment_per_rank: needs train.epoch_augmentation_draws per_step")
    for key, bounds in RANGES.items():
        _check_range(key, get_key(cfg, key), bounds)
    _check_model(cfg)
    if cfg.train.batch_size % cfg.train.subdivision:
        raise ConfigError(
            f"train.subdivision: {cfg.train.subdivision} does not divide train.batch_size {cfg.train.batch_size}"
        )
    if cfg.scheduler.warmup.epochs >= cfg.scheduler.epochs and cfg.scheduler.warmup.type != "none":
        raise ConfigError(
            f"scheduler.warmup.epochs: {cfg.scheduler.warmup.epochs} must be < scheduler.epochs {cfg.scheduler.epochs}"
        )
    aug = cfg.augmentation
    mixers = [m for m in MIXERS if getattr(aug, m)]
    if len(mixers) > 1:
        raise ConfigError(
            "augmentation: " + " and ".join(mixers) + " cannot be combined; a batch has one mixer (pick one)"
        )
    if aug.use_dual_cutout and (mixers or aug.use_cutout):
        other = mixers[0] if mixers else "use_cutout"
        raise ConfigError(f"augmentation.use_dual_cutout cannot be combined with augmentation.{other}")
    lo, hi = (aug.random_erasing.area_ratio_range + [0, 0])[:2]
    if len(aug.random_erasing.area_ratio_range) != 2 or not 0 < lo <= hi <= 1:
        raise ConfigError(
            f"augmentation.random_erasing.area_ratio_range: expected [low, high] with 0 < low <= high <= 1, "
            f"got {aug.random_erasing.area_ratio_range}"
        )
    size = cfg.dataset.image_size or catalog.DATASETS[cfg.dataset.name].shape[1]
    if (aug.use_cutout or aug.use_dual_cutout) and aug.cutout.mask_size > size:
        raise ConfigError(f"augmentation.cutout.mask_size: {aug.cutout.mask_size} is larger than the "
                          f"{size}x{size} images of {cfg.dataset.name} (at most {size})")
    _check_validation_set(cfg.train)
    if cfg.scheduler.type == "multistep" and sorted(cfg.scheduler.milestones) != cfg.scheduler.milestones:
        raise ConfigError(f"scheduler.milestones: must be increasing, got {cfg.scheduler.milestones}")
    _check_total_steps(cfg)


def _check_total_steps(cfg: Config) -> None:
    """scheduler.epochs x steps per epoch within MAX_TOTAL_STEPS (steps per epoch from the named
    dataset's training set and train.batch_size, as the loader makes them)."""
    size = catalog.DATASETS[cfg.dataset.name].split_sizes["train"]
    batch = cfg.train.batch_size
    per_epoch = max(size // batch if cfg.train.dataloader.drop_last else -(-size // batch), 1)
    if cfg.scheduler.epochs * per_epoch > MAX_TOTAL_STEPS:
        raise ConfigError(f"scheduler.epochs: {clip(cfg.scheduler.epochs)} epochs x {per_epoch:,} steps per epoch "
                          f"({cfg.dataset.name}'s {size:,} training images / train.batch_size {batch}) = "
                          f"{cfg.scheduler.epochs * per_epoch:,} optimizer steps, more than the limit of "
                          f"{MAX_TOTAL_STEPS:,}")


def _check_validation_set(train: TrainConfig) -> None:
    """The reference's validation-set switches, in the combinations that do something."""
    if train.start_epoch:
        # The reference starts its epoch loop (and LR schedule) there only to fine-tune loaded
        # weights; here a run continues from its own checkpoint (--resume), which knows its epoch.
        raise ConfigError(f"train.start_epoch: {train.start_epoch} is not supported (0 = from the start); "
                          "continue a run with --resume, which restarts at its checkpoint's epoch")
    if train.use_test_as_val and train.val_ratio:
        raise ConfigError(f"train.val_ratio: {train.val_ratio:g} has no effect while train.use_test_as_val is "
                          "True (the test set validates); set train.use_test_as_val False to hold out a split")
    if not train.use_test_as_val and not train.val_ratio:
        raise ConfigError("train.use_test_as_val: False needs train.val_ratio in (0, 1), the share of the "
                          "training set held out to validate on")


def _check_limits(cfg: Config) -> None:
    """Every value of the RESOLVED config within what its consumers can hold: checked here, not as
    each layer is read, so an override can correct a recipe's value."""
    for key, value in _flatten(cfg.to_dict()).items():
        for v in value if type(value) is list else (value,):
            if type(v) is int and not -INT_LIMIT <= v <= INT_LIMIT:  # a seed of 10**23 overflows int64 late
                raise ConfigError(f"{key}: {clip(v)} is out of range (|value| <= {INT_LIMIT})")
            if type(v) is float and not (math.isfinite(v) and abs(v) <= FLOAT_LIMIT):
                raise ConfigError(f"{key}: expected a finite number of magnitude <= {FLOAT_LIMIT:g}, got {clip(v)}")
            if type(v) is str and "\0" in v:  # a path with one fails deep inside as "embedded null byte"
                raise ConfigError(f"{key}: {clip(v)} holds a NUL byte, which no path or name can hold")


def _check_range(key: str, value: Any, bounds: tuple[float | None, float | None, bool, bool]) -> None:
    lo, hi, lo_in, hi_in = bounds
    ok = (lo is None or (value >= lo if lo_in else value > lo)) and (hi is None or (value <= hi if hi_in else value < hi))
    if ok:
        return
    if lo is not None and hi is not None and hi - lo <= 1:  # a fraction or probability: the interval
        want = f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
    elif lo is not None and (value < lo or (value == lo and not lo_in)):
        want = f"{'>=' if lo_in else '>'} {lo:g}"
    else:
        want = f"{'<=' if hi_in else '<'} {hi:g}"
    raise ConfigError(f"{key}: must be {want}, got {clip(value)}")


def _check_dataset_shape(cfg: Config) -> None:
    """The named dataset's images have a known shape and class count; the data are not resized."""
    entry = catalog.DATASETS[cfg.dataset.name]
    c, h, _ = entry.shape
    classes = entry.n_classes
    ds = cfg.dataset
    if ds.n_channels and ds.n_channels != c:
        raise ConfigError(f"dataset.n_channels: {ds.n_channels} does not match the {c}-channel images of "
                          f"{ds.name} (0 = the dataset's own)")
    if ds.image_size and ds.image_size != h:
        raise ConfigError(f"dataset.image_size: {ds.image_size} does not match the {h}x{h} images of {ds.name} "
                          "(images are not resized; 0 = the dataset's own)")
    if ds.n_classes and ds.n_classes < classes:
        raise ConfigError(f"dataset.n_classes: {ds.n_classes} is fewer than the {classes} classes of {ds.name} "
                          "(0 = the dataset's own)")


def _check_model(cfg: Config) -> None:
    family = cfg.model.name
    entry = catalog.MODELS[family]
    options = getattr(cfg.model, family)
    for option, bounds in entry.ranges.items():
        _check_range(f"model.{family}.{option}", getattr(options, option), bounds)
    block = getattr(options, "block_type", "")
    rule = entry.depth_rules.get(block) or entry.depth_rules.get("")
    if rule is not None:
        a, b = rule
        n, rem = divmod(options.depth - b, a)
        if rem or n < 1:
            kind = f" with block_type '{block}'" if block else ""
            raise ConfigError(f"model.{family}.depth: {options.depth} is not {a}n+{b}{kind} "
                              f"(e.g. {', '.join(str(a * k + b) for k in (1, 2, 3, 9, 18))})")
    problem = entry.check(options) if entry.check else None
    if problem:
        raise ConfigError(problem)
    stages = getattr(options, "preact_stage", None)
    if stages is not None and len(stages) != 3:
        raise ConfigError(f"model.{family}.preact_stage: expected 3 booleans (one per stage), got {clip(stages)}")
    n_blocks = getattr(options, "n_blocks", None)  # the reference's ImageNet-style option
    if n_blocks is not None and (not n_blocks or min(n_blocks) < 1):
        raise ConfigError(f"model.{family}.n_blocks: expected integers >= 1, got {clip(n_blocks)}")
    betas = cfg.optim.adam.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.adam.betas: expected [beta1, beta2] each in [0, 1), got {clip(betas)}")
    bad = [m for m in cfg.scheduler.milestones if m < 0]
    if bad:
        raise ConfigError(f"scheduler.milestones: must be >= 0, got {clip(cfg.scheduler.milestones)}")


# Dynamo neither traces GradScaler.scale/step nor .backward() by default, so the "whole step" it
# compiled was only forward + loss, with no eager fallback; making it one real CUDA graph needs a
# GPU to verify, which this project has not had.
CAPTURABLE_STEP_REMOVED = ("train.capturable_step: removed (it compiled only the forward and loss, never the "
                           "whole step, and had no eager fallback); set it False and use train.compile True")


def precision(cfg: Config) -> str:
    """The canonical precision name (apex's O0..O3 mapped)."""
    return PRECISION_ALIASES.get(cfg.train.precision, cfg.train.precision)


# Keys that do not change what is computed: left out of the run hash.
NON_SEMANTIC = ("train.seed", "train.output_dir", "train.resume", "train.checkpoint", "data_root",
                "dataset.dataset_dir", "device", "train.log_period", "train.use_tensorboard",
                "train.checkpoint_period", "train.dataloader", "validation.dataloader", "train.use_apex",
                "train.dist.local_rank", "train.dist.node_rank", "train.distributed", "train.deterministic",
                "train.epoch_augmentation", "train.epoch_augmentation_max_gb", "train.capturable_step",
                "train.epoch_augmentation_draws")

# Options whose default (False) leaves the run id as it was before the option existed.
HASHED_WHEN_TRUE = ("scheduler.step_before_update", "train.dist.augment_per_rank")


def config_hash(cfg: Config, length: int = 8) -> str:
    """A short hash of everything that decides the result, seed and paths excluded."""
    flat = _flatten(cfg.to_dict())
    dropped = _non_semantic_keys()
    unselected = tuple(f"model.{f.name}." for f in catalog.MODELS.values()
                       if not f.in_every_run_id and f.name != cfg.model.name)
    kept = {k: v for k, v in flat.items() if k not in dropped and not k.startswith(unselected)}
    if cfg.dataset.dataset_dir:
        # An explicit folder selects the data: rows that differ only there are different runs.
        # (Empty, the default, stays out of the hash so that every other run keeps its id.)
        kept["dataset.dataset_dir"] = cfg.dataset.dataset_dir
    if cfg.train.epoch_augmentation_draws != "per_step":
        # Other draws, other numbers: a run id of its own (per_step, the default, keeps every id).
        kept["train.epoch_augmentation_draws"] = cfg.train.epoch_augmentation_draws
    for key in HASHED_WHEN_TRUE:
        if not kept[key]:  # off, the default: every run that never set it keeps its id
            del kept[key]
    if not cfg.augmentation.use_ricap:
        del kept["augmentation.ricap.offsets"]  # decides nothing without RICAP
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=None)
def _non_semantic_keys() -> frozenset[str]:
    return frozenset(k for k in all_keys() if any(k == n or k.startswith(n + ".") for n in NON_SEMANTIC))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dump(cfg: Config, path: str | Path) -> None:
    """The resolved config as UTF-8 YAML; paths as the characters they name (see utils.text_form),
    so that config.yaml reads back whatever the locale."""
    from imgclf.utils import atomic_write_text, text_form

    atomic_write_text(path, yaml.safe_dump(text_form(cfg.to_dict()), sort_keys=False))


def diff(cfg: Config, base: Config | None = None) -> dict[str, Any]:
    """Dotted keys whose values differ from ``base`` (default: the schema defaults)."""
    a, b = _flatten(cfg.to_dict()), _flatten((base or Config()).to_dict())
    return {k: v for k, v in a.items() if b.get(k) != v}

