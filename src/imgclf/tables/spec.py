"""Table specs (``config/tables/<table>.yaml``) and their expansion into runs.

A spec::

    title: CIFAR-10 results
    seeds: [0, 1, 2]                 # optional, default [0, 1, 2]
    columns: ["Batch size"]          # optional extra descriptive columns (values in row.cells)
    notes: |                         # optional, printed under the rendered table
      ...
    rows:
      - id: resnet_preact_110        # unique in the table; [a-z0-9_]+
        label: ResNet-preact-110     # as printed in the reference README
        recipe: cifar/resnet_preact.yaml       # relative to config/recipes/
        overrides: {model.resnet_preact.depth: 110}
        cells: {"Batch size": 128}   # values of the extra columns
        resources: {gpus: 1, time_min: 600}    # optional, for the cluster
        reported: {result: 6.47, result_text: null, paper: "6.37 (median of 5 runs)",
                   epochs: 160, time: 3h05m, hardware: GTX 980}
        train: true                  # false: a paper-only row, shown but never trained

``reported`` values are printed beside ours and never used to compute anything.
The run id depends only on the resolved config (seed and paths excluded), so equal
rows of different tables share runs.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf import config as C
from imgclf.launch.resources import problem as resource_problem
from imgclf.runs import preflight, run_id
from imgclf.utils import clip

ROW_KEYS = {"id", "label", "recipe", "overrides", "cells", "resources", "reported", "train", "seeds"}
TABLE_KEYS = {"title", "seeds", "columns", "notes", "rows", "description"}
REPORTED_KEYS = {"result", "result_text", "paper", "epochs", "time", "hardware"}
RESOURCE_KEYS = {"gpus", "nodes", "tasks", "time_min", "mem_gb", "cpus_per_task", "partition", "seeds_per_gpu",
                 "gpu_share"}
_ID = re.compile(r"[a-z0-9][a-z0-9_]*")  # used with fullmatch: '$' would let "id\n" through


def _seeds_ok(seeds: Any) -> bool:
    """A non-empty list of distinct integer seeds: 'median of 3 runs' must be three runs."""
    return isinstance(seeds, list) and bool(seeds) and all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= C.INT_LIMIT for s in seeds) \
        and len(set(seeds)) == len(seeds)


# A spec's name or path is echoed whole up to this length (a recipe's absolute path in a deep
# checkout is longer than a key); longer or multi-line values are cut.
SHOWN_CHARS = 200


def _show(value: Any) -> str:
    """A name from the spec as the message shows it: quoted, or cut when it is not a short string."""
    return f"'{value}'" if isinstance(value, str) and len(value) <= SHOWN_CHARS and "\n" not in value else clip(value)


class SpecError(ValueError):
    """A malformed table spec; the message names the file, row and key."""


@dataclass
class Row:
    id: str
    label: str
    recipe: str
    overrides: dict[str, Any]
    cells: dict[str, Any]
    resources: dict[str, Any]
    reported: dict[str, Any]
    train: bool
    seeds: list[int]
    run_id: str | None = None  # None for paper-only rows
    config: C.Config | None = None


@dataclass
class Table:
    name: str
    path: Path
    title: str
    seeds: list[int]
    columns: list[str]
    notes: str
    rows: list[Row] = field(default_factory=list)


def _closest(key: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def load(path: str | Path, recipes_dir: str | Path = "config/recipes") -> Table:
    """Read, validate and resolve one table spec. Raises :class:`SpecError` (one line)."""
    path = Path(path)
    try:
        data = C.load_yaml(path)
    except C.ConfigError as e:
        raise SpecError(str(e)) from None
    where = f"{path}: "
    unknown = set(data) - TABLE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SpecError(f"{where}unknown top-level key {_show(key)}{_closest(str(key)[:100], TABLE_KEYS)}")
    if not isinstance(data.get("title"), str):
        raise SpecError(f"{where}'title' must be a string")
    seeds = data.get("seeds", [0, 1, 2])
    if not _seeds_ok(seeds):
        raise SpecError(f"{where}'seeds' must be a non-empty list of distinct integers >= 0, got {clip(seeds)}")
    columns = data.get("columns", [])
    if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise SpecError(f"{where}'columns' must be a list of column names")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        raise SpecError(f"{where}'rows' must be a non-empty list")
    table = Table(path.stem, path, data["title"], seeds, columns, data.get("notes", "") or "")
    seen: set[str] = set()
    for i, raw in enumerate(rows):
        table.rows.append(_row(raw, i, where, seen, table, Path(recipes_dir)))
    return table


def _row(raw: Any, i: int, where: str, seen: set[str], table: Table, recipes_dir: Path) -> Row:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}rows[{i}] must be a mapping")
    rid = raw.get("id")
    at = f"{where}row {_show(rid)}: " if rid else f"{where}rows[{i}]: "
    unknown = set(raw) - ROW_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise SpecError(f"{at}unknown key {_show(key)}{_closest(str(key)[:100], ROW_KEYS)}")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise SpecError(f"{at}'id' must match [a-z0-9][a-z0-9_]*, got {clip(rid)}")
    if rid in seen:
        raise SpecError(f"{at}duplicate row id '{rid}'")
    seen.add(rid)
    for key in ("label", "recipe"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise SpecError(f"{at}'{key}' must be a non-empty string")
    for key in ("overrides", "cells", "resources", "reported"):
        if not isinstance(raw.get(key, {}) or {}, dict):
            raise SpecError(f"{at}'{key}' must be a mapping")
    overrides = dict(raw.get("overrides") or {})
    cells = dict(raw.get("cells") or {})
    resources = dict(raw.get("resources") or {})
    reported = dict(raw.get("reported") or {})
    for key, valid in (("reported", REPORTED_KEYS), ("resources", RESOURCE_KEYS)):
        bad = set(locals()[key]) - valid
        if bad:
            k = sorted(bad)[0]
            raise SpecError(f"{at}unknown {key} key {_show(k)}{_closest(str(k)[:100], valid)}")
    for key, value in resources.items():
        # Checked as SLURM will read it: a value that passes planning must pass sbatch too.
        said = resource_problem(key, value)
        if said:
            raise SpecError(f"{at}resources.{key}: {said}")
    bad_keys = [k for k in overrides if not isinstance(k, str) or not k]
    if bad_keys:
        raise SpecError(f"{at}override key {clip(bad_keys[0])} is not a config key like 'train.base_lr'")
    bad_cells = set(cells) - set(table.columns)
    if bad_cells:
        raise SpecError(f"{at}cell '{sorted(bad_cells)[0]}' is not a declared column (columns: {table.columns})")
    if any(k in overrides for k in ("train.output_dir", "train.seed", "data_root")):
        raise SpecError(f"{at}overrides may not set train.output_dir, train.seed or data_root (the workflow does)")
    train = raw.get("train", True)
    if not isinstance(train, bool):
        raise SpecError(f"{at}'train' must be true or false")
    seeds = raw.get("seeds", table.seeds)
    if not _seeds_ok(seeds):
        raise SpecError(f"{at}'seeds' must be a non-empty list of distinct integers >= 0, got {clip(seeds)}")
    recipe = recipes_dir / raw["recipe"]
    if Path(raw["recipe"]).is_absolute() or not recipe.resolve().is_relative_to(recipes_dir.resolve()):
        raise SpecError(f"{at}recipe {_show(raw['recipe'])} must be a path inside {recipes_dir}/ (e.g. cifar/wrn.yaml)")
    if not recipe.is_file():
        raise SpecError(f"{at}recipe {_show(raw['recipe'])} not found under {recipes_dir}/")
    row = Row(rid, raw["label"], raw["recipe"], overrides, cells, resources, reported, train, list(seeds))
    try:
        cfg = C.build(recipe, overrides)
    except C.ConfigError as e:
        raise SpecError(f"{at}{e}") from None
    ranks = int(resources.get("nodes", 1) or 1) * int(resources.get("gpus", 0) or resources.get("tasks", 1) or 1)
    if ranks > 1:
        # BN statistics are per rank: N ranks is a different computation from one process.
        cfg.train.dist.world_size = ranks
    row.config = cfg
    if train:
        try:
            preflight(cfg, build=False)  # torch-free: `snakemake -n` refuses a row whose job could never run
        except C.ConfigError as e:
            raise SpecError(f"{at}{e}") from None
        row.run_id = run_id(cfg)
    return row


def load_all(tables_dir: str | Path = "config/tables", recipes_dir: str | Path = "config/recipes") -> dict[str, Table]:
    return {p.stem: load(p, recipes_dir) for p in sorted(Path(tables_dir).glob("*.yaml"))}
