"""The reference README's results tables, as code: config/tables/*.yaml against the README itself.

The reference README (hysts/pytorch_image_classification, here a Japanese machine translation) is
found via $IMGCLF_REFERENCE_README, else the first ``*.txt`` in ``<repo>/../shared/seed/``; the
tests that need it are skipped when it is absent. Its Markdown tables are parsed in order and
matched, table by table and row by row, with the spec files in ``README_TABLES``: same number of
rows, same reported test error (and its qualifier: "1 run", "best 0.67"), epochs, training time
and descriptive columns (batch size, initial lr, ...). The row labels are machine-translated, so
they are only checked for what survives translation: the model family and the augmentation.

Run with ``-s`` to see one summary line per table.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import require

from imgclf import config as C
from imgclf.tables import spec

ROOT = Path(__file__).resolve().parents[1]
TABLES_DIR = ROOT / "config" / "tables"
RECIPES_DIR = ROOT / "config" / "recipes"

# The README's tables in the order they appear; each maps to the spec files whose rows,
# concatenated, are that table's rows in order.
README_TABLES: list[tuple[str, ...]] = [
    ("cifar10",),
    ("cifar10_resnet_preact_20_widened",),
    ("cifar10_wrn_28_10_regularization", "cifar10_shake_shake_regularization"),
    ("cifar10_multi_gpu",),
    ("fashion_mnist",),
    ("fashion_mnist_resnet_preact_20",),
    ("mnist",),
    ("kmnist",),
    ("residual_units",),
    ("label_smoothing_mixup_ricap",),
    ("batch_size_lr_linear_scaling_cosine",),
    ("batch_size_lr_linear_scaling_multistep",),
    ("batch_size_lr_linear_scaling_400_epochs",),
    ("batch_size_lr_linear_scaling_800_epochs",),
    *[(f"batch_size_lr_initial_lr_{bs}",) for bs in (4096, 2048, 1024, 512, 256, 128, 64, 32)],
    *[(f"batch_size_lr_good_lr_{ep}_epochs",) for ep in (200, 800, 1600, 3200, 6400)],
    *[(f"lars_{bs}",) for bs in (4096, 2048, 1024, 512, 256, 128)],
    ("lars_long_training",),
    ("ghost_bn_200_epochs_baseline",),
    ("ghost_bn_200_epochs",),
    ("ghost_bn_1600_epochs_baseline",),
    ("ghost_bn_1600_epochs",),
    *[(f"no_weight_decay_on_bn_{bs}",) for bs in (4096, 2048, 1024)],
    ("fp16_1080ti_fp32",),
    ("fp16_1080ti_fp16",),
    ("fp16_1080ti_mixed",),
    ("fp16_v100",),
]

# README column header (Japanese machine translation or English) -> our column name(s).
HEADER_COLUMNS = {
    "バッチサイズ": ("Batch size", "Batch size per GPU"),
    "batch size": ("Batch size", "Batch size per GPU"),
    "#gpus": ("#GPUs",),
    "初期lr": ("Initial LR",),
    "initial lr": ("Initial LR",),
    "lrスケジュール": ("LR schedule",),
    "lr schedule": ("LR schedule",),
    "ゴーストバッチサイズ": ("Ghost batch size",),
    "ghost batch size": ("Ghost batch size",),
    "オプティマイザ": ("Optimizer",),
    "optimizer": ("Optimizer",),
    "bnの重量減衰": ("Weight decay on BN",),
    "weight decay on bn": ("Weight decay on BN",),
    "重量減衰": ("Weight decay",),
    "weight decay": ("Weight decay",),
    "精度": ("Precision",),
    "precision": ("Precision",),
}
# Cell values as the translation prints them -> ours (compared case-insensitively).
CELL_WORDS = {"余弦": "cosine", "マルチステップ": "multistep", "ラース": "lars", "はい": "yes", "いいえ": "no",
              "混合": "mixed"}


# --------------------------------------------------------------------------- README parsing
def reference_readme() -> Path | None:
    env = os.environ.get("IMGCLF_REFERENCE_README")
    if env:
        return Path(env) if Path(env).is_file() else None
    seed_dir = ROOT.parent / "shared" / "seed"
    found = sorted(seed_dir.glob("*.txt")) if seed_dir.is_dir() else []
    return found[0] if found else None


_SEPARATOR = re.compile(r"^\s*\|\s*-")


def _cells(line: str) -> list[str]:
    line = line[line.index("|"):].strip()
    return [c.strip() for c in line.strip("|").split("|")]


def parse_tables(text: str) -> list[dict]:
    """Markdown tables in order: {'header': [...], 'rows': [[...], ...]}.

    A header is any line holding '|' that is followed by a '|---' line (the translation glues some
    headers to the end of a command line); rows are the '|' lines that follow.
    """
    lines = text.splitlines()
    tables: list[dict] = []
    current = None
    for i, line in enumerate(lines):
        if _SEPARATOR.match(line):
            continue
        if "|" in line and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            current = {"header": _cells(line), "rows": []}
            tables.append(current)
        elif line.lstrip().startswith("|") and current is not None:
            current["rows"].append(_cells(line))
        else:
            current = None
    return tables


@functools.lru_cache(maxsize=1)
def readme_tables() -> list[dict] | None:
    path = reference_readme()
    if path is None:
        return None
    return parse_tables(path.read_text(encoding="utf-8"))


def need_readme() -> list[dict]:
    tables = readme_tables()
    require(tables is not None,
            "reference README not found: set IMGCLF_REFERENCE_README or put it in <repo>/../shared/seed/*.txt")
    return tables


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_result(cell: str) -> tuple[float | None, list[str]]:
    """'3.87(1ラン)' -> (3.87, ['1']); '0.82(ベスト0.67)' -> (0.82, ['0.67']); '' -> (None, [])."""
    cell = cell.strip()
    if not cell:
        return None, []
    m = re.match(r"(\d+(?:\.\d+)?)\s*(?:\((.*)\))?", cell)
    assert m, f"unparseable result cell {cell!r}"
    return float(m.group(1)), _NUMBER.findall(m.group(2) or "")


def norm_time(cell: str | None) -> str | None:
    """'3H06M' / '25m*' / '95分' / '95 min' -> '3h06m' / '25m' / '95m'."""
    if not cell or not cell.strip():
        return None
    s = cell.strip().lower().rstrip("*").replace("分", "m").replace(" min", "m").replace(" ", "")
    return s


def norm_value(v) -> str | float:
    s = str(v).strip()
    try:
        return float(s)
    except ValueError:
        s = s.lower()
        return CELL_WORDS.get(s, s)


def column_index(header: list[str], *keys: str) -> int | None:
    for i, h in enumerate(header):
        if any(k in h.lower() for k in keys):
            return i
    return None


# --------------------------------------------------------------------------- what labels keep
def family(label: str) -> str | None:
    s = label.lower()
    if "shake" in s:
        return "shake_shake"
    if "pyramid" in s:
        return "pyramidnet"
    if "resnext" in s or "snnext" in s:
        return "resnext"
    if "densen" in s:
        return "densenet"
    if "wrn" in s:
        return "wrn"
    if "vgg" in s:
        return "vgg"
    if "resnet" in s:
        return "resnet_preact" if "pre" in s else "resnet"
    return None


_CUTOUT = re.compile(r"(?:カットアウト|切り抜き|sutout|cutout)\s*(\d+)?", re.I)
_DUAL = re.compile(r"デュアルカットアウト|dual-cutout|dual cutout", re.I)


def check_label(readme_label: str, row: spec.Row, where: str) -> None:
    """The facts a machine-translated label still carries: model family and augmentation."""
    cfg = row.config
    fam = family(readme_label)
    if fam is not None:
        assert cfg.model.name == fam, f"{where}: README label {readme_label!r} is a {fam}, ours is {cfg.model.name}"
    s = readme_label.lower()
    aug = cfg.augmentation
    if _DUAL.search(readme_label):
        assert aug.use_dual_cutout, f"{where}: {readme_label!r} uses dual-cutout"
    else:
        m = _CUTOUT.search(readme_label)
        assert bool(m) == aug.use_cutout, f"{where}: {readme_label!r} vs use_cutout={aug.use_cutout}"
        if m and m.group(1):
            assert aug.cutout.mask_size == int(m.group(1)), f"{where}: {readme_label!r} vs mask {aug.cutout.mask_size}"
    assert (("ミックスアップ" in s) or ("mixup" in s)) == aug.use_mixup, f"{where}: {readme_label!r} vs use_mixup"
    assert (("ricap" in s) or ("リカップ" in s)) == aug.use_ricap, f"{where}: {readme_label!r} vs use_ricap"
    assert ("ラベルスムージング" in s or "label smoothing" in s) == aug.use_label_smoothing, f"{where}: label smoothing"
    if aug.use_label_smoothing:
        eps = float(re.search(r"(?:epsilon|イプシロン)\s*=\s*([\d.]+)", readme_label, re.I).group(1))
        assert math.isclose(aug.label_smoothing.epsilon, eps), f"{where}: epsilon {aug.label_smoothing.epsilon} != {eps}"
    m = re.search(r"alpha\s*=\s*([\d.]+)", readme_label, re.I)
    if m and aug.use_mixup:
        assert math.isclose(aug.mixup.alpha, float(m.group(1))), f"{where}: mixup alpha"
    if "拡大因子4" in readme_label or "widening factor 4" in s:
        assert get(cfg, "initial_channels") == 64, f"{where}: widening factor 4 -> initial_channels 64"


def get(cfg: C.Config, option: str):
    return getattr(getattr(cfg.model, cfg.model.name), option)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tables() -> dict[str, spec.Table]:
    return spec.load_all(TABLES_DIR, RECIPES_DIR)


# --------------------------------------------------------------------------- tests
def test_all_specs_load(tables):
    assert tables, "no table specs under config/tables/"
    total = sum(len(t.rows) for t in tables.values())
    trained = sum(r.train for t in tables.values() for r in t.rows)
    runs = {r.run_id for t in tables.values() for r in t.rows if r.train}
    for name, t in tables.items():
        print(f"  {name}: {len(t.rows)} rows")
    print(f"{len(tables)} tables, {total} rows ({trained} to train, {total - trained} paper-only), "
          f"{len(runs)} distinct runs")


def test_row_ids_unique_per_table():
    for path in sorted(TABLES_DIR.glob("*.yaml")):
        ids = [r.get("id") for r in yaml.safe_load(path.read_text())["rows"]]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        assert not dupes, f"{path.name}: duplicate row ids {dupes}"


def test_reported_result_is_float_or_null(tables):
    for name, t in tables.items():
        for r in t.rows:
            v = r.reported.get("result")
            assert v is None or isinstance(v, float), f"{name}/{r.id}: reported.result {v!r} is not a float or null"


def test_rows_agree_with_their_configs(tables):
    """Descriptive columns and reported epochs say what the resolved config does."""
    precisions = {"fp32": "fp32", "fp16": "fp16", "mixed": "amp"}
    for name, t in tables.items():
        for r in t.rows:
            cfg, where = r.config, f"{name}/{r.id}"
            c = r.cells
            gpus = c.get("#GPUs", 1)
            if "#GPUs" in c:
                assert r.resources.get("gpus") == gpus, where
                assert cfg.train.distributed == (gpus > 1), where
                assert cfg.train.batch_size == c["Batch size per GPU"] * gpus, where
            if "Batch size" in c:
                assert cfg.train.batch_size == c["Batch size"], where
            if "Initial LR" in c:
                assert math.isclose(cfg.train.base_lr, c["Initial LR"]), where
            if "LR schedule" in c:
                assert cfg.scheduler.type == c["LR schedule"], where
            if "Optimizer" in c:
                assert cfg.train.optimizer == c["Optimizer"].lower(), where
            if "Ghost batch size" in c:
                ghost = c["Ghost batch size"]
                expected = 1 if ghost == "n/a" else cfg.train.batch_size // ghost
                assert cfg.train.subdivision == expected, where
            if "Weight decay" in c:
                assert math.isclose(cfg.train.weight_decay, float(c["Weight decay"])), where
            if "Weight decay on BN" in c:
                assert cfg.train.no_weight_decay_on_bn == (c["Weight decay on BN"] == "No"), where
            if "Precision" in c:
                assert C.precision(cfg) == precisions[c["Precision"].lower()], where
            if r.reported.get("epochs") and r.train:
                assert cfg.scheduler.epochs == r.reported["epochs"], where


def test_rows_on_different_gpu_counts_are_different_runs(tables):
    """Same global batch on 2, 4 or 8 GPUs is not the same run: BN statistics are per GPU."""
    seen: dict[str, tuple[str, int]] = {}
    for name, t in tables.items():
        for r in t.rows:
            if not r.train:
                continue
            gpus = r.resources.get("gpus", 1)
            if r.run_id in seen:
                other, other_gpus = seen[r.run_id]
                assert other_gpus == gpus, f"{name}/{r.id} ({gpus} GPUs) shares run {r.run_id} with {other} ({other_gpus})"
            else:
                seen[r.run_id] = (f"{name}/{r.id}", gpus)


def test_mapping_names_existing_specs(tables):
    named = [n for names in README_TABLES for n in names]
    assert len(named) == len(set(named)), "a spec is mapped to two README tables"
    missing = [n for n in named if n not in tables]
    assert not missing, f"README_TABLES names specs that do not exist: {missing}"
    extra = sorted(set(tables) - set(named))
    if extra:
        print(f"specs not from the reference README: {extra}")


def test_readme_has_the_mapped_tables():
    found = need_readme()
    assert len(found) == len(README_TABLES), (
        f"the reference README has {len(found)} tables, README_TABLES maps {len(README_TABLES)}")


@pytest.mark.parametrize("index", range(len(README_TABLES)), ids=["+".join(n) for n in README_TABLES])
def test_reference_table_matches_spec(index, tables):
    found = need_readme()
    if index >= len(found):
        pytest.fail(f"the reference README has only {len(found)} tables")
    table = found[index]
    names = README_TABLES[index]
    rows = [(n, r) for n in names for r in tables[n].rows]
    header = table["header"]
    where0 = f"README table {index} -> {'+'.join(names)}"
    assert len(table["rows"]) == len(rows), f"{where0}: README has {len(table['rows'])} rows, specs {len(rows)}"
    i_result = column_index(header, "エラー", "error")
    i_epochs = column_index(header, "エポック", "epoch")
    i_time = column_index(header, "時間", "time")
    i_paper = column_index(header[i_result + 1:], "論文", "paper") if i_result is not None else None
    extra = {i: HEADER_COLUMNS[h.lower()] for i, h in enumerate(header) if h.lower() in HEADER_COLUMNS}
    assert i_result is not None, f"{where0}: no test error column in {header}"
    with_result = 0
    for k, (cells, (name, row)) in enumerate(zip(table["rows"], rows)):
        where = f"{where0} row {k} ({name}/{row.id})"
        cells = cells + [""] * (len(header) - len(cells))
        label = cells[0]
        assert label, f"{where}: README row without a model label"
        check_label(label, row, where)
        value, qualifier = parse_result(cells[i_result])
        ours = row.reported.get("result")
        if value is None:
            assert ours is None, f"{where}: README has no result, ours {ours}"
        else:
            with_result += 1
            assert ours is not None and math.isclose(ours, value), f"{where}: README {value}, ours {ours}"
        text = row.reported.get("result_text") or ""
        for number in qualifier:
            assert number in text, f"{where}: README qualifier {cells[i_result]!r}, our result_text {text!r}"
        if not qualifier:
            assert not text, f"{where}: README has no qualifier, our result_text {text!r}"
        if i_epochs is not None:
            assert row.reported.get("epochs") == int(cells[i_epochs]), f"{where}: epochs"
        if i_time is not None:
            assert row.reported.get("time") == norm_time(cells[i_time]), (
                f"{where}: time README {cells[i_time]!r}, ours {row.reported.get('time')!r}")
        if i_paper is not None:
            paper_cell = cells[i_result + 1 + i_paper]
            paper_numbers = _NUMBER.findall(paper_cell)
            ours_paper = str(row.reported.get("paper", ""))
            assert _NUMBER.findall(ours_paper) == paper_numbers, f"{where}: paper {paper_cell!r} vs {ours_paper!r}"
        for i, candidates in extra.items():
            col = next((c for c in candidates if c in row.cells), None)
            assert col is not None, f"{where}: no column among {candidates} for README column {header[i]!r}"
            assert norm_value(row.cells[col]) == norm_value(cells[i]), (
                f"{where}: {col} README {cells[i]!r}, ours {row.cells[col]!r}")
    print(f"README table {index:2d} -> {'+'.join(names)}: {len(rows)} rows ({with_result} with a result), match")
