"""Run identity, run directories, and the one preflight every entry point calls.

``run_id`` = a readable slug + a short hash of the resolved config without seed and
paths, so equal rows of different tables share one run.
"""
from __future__ import annotations

import re
from pathlib import Path

from imgclf import catalog
from imgclf import config as C
from imgclf.utils import InputError, os_form, read_yaml

# What makes a folder a run: a checkpoint or a finished result. A folder holding only its
# config.yaml (a run refused or killed before its first checkpoint) is not one yet.
RUN_STATE = ("checkpoint.pt", "checkpoint.prev.pt", "model.pt", "result.json", "eval.json")
# Everything else imgclf writes into a run directory: the config, the log, the checkpoints' sidecars,
# the job record and lock, submitit's folder, records set aside as corrupt. A folder holding any
# other name holds someone else's files, and training into it would overwrite them.
OWN_FILES = frozenset({*RUN_STATE, "config.yaml", "env.json", "train_log.csv", "checkpoint.json",
                       "checkpoint.prev.json", "diverged.json", "job.json", ".lock", "submitit",
                       "result.json.corrupt", "eval.json.corrupt"})
_TEMP_FILE = re.compile(r"\.(.+)\.[A-Za-z0-9_]+\.tmp")  # an atomic write's temp file (utils.atomic_write_bytes)


def run_id(cfg: C.Config) -> str:
    return f"{cfg.dataset.name.lower()}-{cfg.model.name}-{C.config_hash(cfg)}"


def input_shape(cfg: C.Config) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input: the config's, else its dataset's."""
    c, h, w = catalog.DATASETS[cfg.dataset.name].shape
    return (cfg.dataset.n_channels or c, cfg.dataset.image_size or h, cfg.dataset.image_size or w)


def n_classes(cfg: C.Config) -> int:
    return cfg.dataset.n_classes or catalog.DATASETS[cfg.dataset.name].n_classes


def preflight(cfg: C.Config, *, build: bool = True) -> None:
    """Refuse, before anything starts, a resolved config whose job could never run to the end.

    Called by ``imgclf train``, by the planner for every trained row of every table (so that
    ``snakemake -n`` names the table, row and key) and by the workflow's training job before it
    submits (so that a cluster job does not fail after its queue wait). ``build`` also builds the
    model, optimizer and LR schedule on torch's meta device, without data or memory (the
    builders' own checks); the planner leaves it out, so that planning never imports torch.
    (A device the job will not have, e.g. fp16 without a GPU, depends on where it runs: the
    launchers check that, ``launch.jobs.device_problem``.)"""
    n_train = catalog.DATASETS[cfg.dataset.name].split_sizes["train"]
    if cfg.train.batch_size > n_train and cfg.train.dataloader.drop_last:
        raise C.ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training "
                            f"images of {cfg.dataset.name}")
    ranks, chunks = cfg.train.dist.world_size, cfg.train.subdivision
    if ranks > 1 and cfg.train.batch_size % (ranks * chunks):
        raise C.ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by its {ranks} ranks x "
                            f"train.subdivision {chunks}; choose a multiple of {ranks * chunks}")
    if cfg.dataset.n_classes and cfg.dataset.n_classes < catalog.DATASETS[cfg.dataset.name].n_classes:
        raise C.ConfigError(f"dataset.n_classes: {cfg.dataset.n_classes} is fewer than the "
                            f"{catalog.DATASETS[cfg.dataset.name].n_classes} classes of {cfg.dataset.name} "
                            "(0 = the dataset's own)")
    if build:
        import importlib.util

        import torch

        if cfg.train.use_tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise C.ConfigError("train.use_tensorboard: needs the tensorboard package (pip install tensorboard), "
                                "which is not installed; install it or set train.use_tensorboard False")

        from imgclf.models import build as build_model
        from imgclf.optim import build_optimizer
        from imgclf.optim.schedules import SchedulePlan

        with torch.device("meta"):
            model = build_model(cfg, in_channels=input_shape(cfg)[0], n_classes=n_classes(cfg))
        build_optimizer(cfg, model)
        SchedulePlan.from_config(cfg.scheduler, 1)


def default_dir(cfg: C.Config, root: str | Path = "results/runs") -> Path:
    return Path(root) / run_id(cfg) / f"seed{cfg.train.seed}"


def load_run_config(run_dir: str | Path) -> C.Config:
    """The resolved config.yaml of a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a run directory starts with its resolved config.yaml")
    try:
        data = _read_run_yaml(path)
    except InputError as e:
        raise C.ConfigError(f"{e}; remove the run directory") from None
    if not isinstance(data, dict):
        raise C.ConfigError(f"{path}: expected a mapping of config keys; remove the run directory")
    try:
        return C.from_dict(data)
    except C.ConfigError as e:
        raise C.ConfigError(f"{path}: {e}") from None


def _read_run_yaml(path: Path):
    """A run's config.yaml (UTF-8), its paths usable by this process whatever its locale."""
    return os_form(read_yaml(path, "the run's resolved config") or {})


def prepare(cfg: C.Config, run_dir: str | Path, *, resume: bool) -> Path:
    """Write the resolved config into ``run_dir`` (atomically). An existing run directory
    must hold the same config and seed; without ``resume`` it must not hold a checkpoint.
    A folder that never reached its first checkpoint holds no run: its config is replaced, so a
    corrected command works after a refused or crashed one. A folder holding anything imgclf does
    not write is refused (see :func:`foreign_files`)."""
    run_dir = Path(run_dir)
    check_target(cfg, run_dir, resume=resume)
    cfg.train.output_dir = str(run_dir)
    C.dump(cfg, run_dir / "config.yaml")
    return run_dir


def check_target(cfg: C.Config, run_dir: str | Path, *, resume: bool) -> None:
    """What :func:`prepare` refuses, without writing anything."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    _check_own(run_dir)
    if path.is_file() and has_run(run_dir):
        try:
            data = _read_run_yaml(path)
            if not isinstance(data, dict):
                raise C.ConfigError("not a mapping of config keys")
            old = C.from_dict(data)
        except (C.ConfigError, InputError) as e:
            why = str(e).removeprefix(f"{path}: ").removeprefix(str(path))
            raise C.ConfigError(f"{path}: existing config is unreadable ({why}); remove the run directory") from None
        if C.config_hash(old) != C.config_hash(cfg) or old.train.seed != cfg.train.seed:
            changed = ", ".join(sorted(set(C.diff(cfg, old)) - {"train.output_dir", "data_root"})[:4])
            raise C.ConfigError(f"{run_dir}: holds a run of a different config ({changed}); "
                                "choose another --output-dir")
        if not resume:
            raise C.ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose "
                                "another --output-dir")


def foreign_files(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` that imgclf never writes there, sorted."""
    def own(name: str) -> bool:
        temp = _TEMP_FILE.fullmatch(name)
        return name in OWN_FILES or (temp is not None and temp.group(1) in OWN_FILES)

    return sorted(p.name for p in Path(run_dir).iterdir() if not own(p.name))


def _names(names: list[str], n: int = 4) -> str:
    """A few names (each cut to 60 characters), and how many more."""
    return ", ".join(name[:60] for name in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_own(run_dir: Path) -> None:
    """An output folder is new, empty, or a run directory: a folder of someone else's files (a
    model.pt without our config.yaml, the project's config/) is refused before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise C.ConfigError(f"{run_dir}: exists and is not a folder; choose another --output-dir")
    if not run_dir.is_dir():
        return
    foreign = foreign_files(run_dir)
    if foreign:
        raise C.ConfigError(f"{run_dir}: not empty and not a run directory (holds {_names(foreign)}); "
                            "choose an empty or new --output-dir")
    path = run_dir / "config.yaml"
    if not path.is_file():
        state = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_STATE)
        if state:
            raise C.ConfigError(f"{run_dir}: holds {_names(state)} but no config.yaml, so no run imgclf can "
                                "continue; choose an empty or new --output-dir")
        return
    if has_run(run_dir):
        return  # check_target compares its config with this one
    try:
        data = _read_run_yaml(path)
        if not isinstance(data, dict):
            raise C.ConfigError("not a mapping of config keys")
        C.from_dict(data)
    except (C.ConfigError, InputError) as e:
        why = " ".join(str(e).removeprefix(f"{path}: ").removeprefix(str(path)).split())[:200]
        raise C.ConfigError(f"{path}: not a run's resolved config ({why}); choose an empty or new "
                            "--output-dir, or remove the file") from None


def has_run(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_STATE)


def verify(run_dir: str | Path, cfg: C.Config, result: dict) -> None:
    """A finished run directory against its own recorded identity: the config hash and seed that
    result.json recorded when the run was trained, and the <run_id>/seed<k> folder names. An edited
    config.yaml would otherwise have ``imgclf evaluate`` score the old weights under a new config."""
    run_dir = Path(run_dir)
    recorded = result.get("config_hash")
    now = C.config_hash(cfg)
    if recorded is not None and recorded != now:
        raise C.ConfigError(f"{run_dir / 'config.yaml'}: changed after the run was trained (config hash {now}, "
                            f"trained as {str(recorded)[:16]}); restore it or train the run again")
    seed = result.get("seed")
    if seed is not None and seed != cfg.train.seed:
        raise C.ConfigError(f"{run_dir / 'config.yaml'}: train.seed {cfg.train.seed} differs from the trained "
                            f"seed {str(seed)[:24]}; restore it or train the run again")
    if re.fullmatch(r"seed\d+", run_dir.name) and run_dir.name != f"seed{cfg.train.seed}":
        raise C.ConfigError(f"{run_dir}: holds train.seed {cfg.train.seed}, not the folder's {run_dir.name}")
    parent = run_dir.resolve().parent.name
    if re.fullmatch(r"[a-z0-9]+-[a-z_]+-[0-9a-f]{8}", parent) and parent != run_id(cfg):
        raise C.ConfigError(f"{run_dir / 'config.yaml'}: resolves to run {run_id(cfg)}, not the folder's "
                            f"{parent}; restore it or train the run again")
