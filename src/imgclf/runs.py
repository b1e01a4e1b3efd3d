"""Run identity and run directories.

``run_id`` = a readable slug + a short hash of the resolved config without seed and
paths, so equal rows of different tables share one run.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from imgclf import config as C


def run_id(cfg: C.Config) -> str:
    return f"{cfg.dataset.name.lower()}-{cfg.model.name}-{C.config_hash(cfg)}"


def default_dir(cfg: C.Config, root: str | Path = "results/runs") -> Path:
    return Path(root) / run_id(cfg) / f"seed{cfg.train.seed}"


def prepare(cfg: C.Config, run_dir: str | Path, *, resume: bool) -> Path:
    """Write the resolved config into ``run_dir`` (atomically). An existing run directory
    must hold the same config and seed; without ``resume`` it must not hold a checkpoint."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise C.ConfigError("not a mapping of config keys")
            old = C.from_dict(data)
        except (C.ConfigError, yaml.YAMLError) as e:
            mark = getattr(e, "problem_mark", None)
            why = f"not valid YAML at line {mark.line + 1}" if mark else (getattr(e, "problem", None) or str(e))
            raise C.ConfigError(f"{path}: existing config is unreadable ({why}); remove the run directory") from None
        if C.config_hash(old) != C.config_hash(cfg) or old.train.seed != cfg.train.seed:
            changed = ", ".join(sorted(set(C.diff(cfg, old)) - {"train.output_dir", "data_root"})[:4])
            raise C.ConfigError(f"{run_dir}: holds a run of a different config ({changed}); "
                                "choose another --output-dir")
        if not resume and ((run_dir / "checkpoint.pt").exists() or (run_dir / "result.json").exists()):
            raise C.ConfigError(f"{run_dir}: already holds a run; pass --resume to continue it or choose "
                                "another --output-dir")
    cfg.train.output_dir = str(run_dir)
    C.dump(cfg, path)
    return run_dir
