"""Hostile input: each class of bad input with its own cases.

1. resource bombs (YAML alias bombs and recursive aliases, gzip bombs, IDX headers claiming huge
   counts, symlinked directories), 2. values out of range (checked when a config resolves, so
   planning refuses a table row), 3. undecodable files, 4. a refused input leaves no state,
5. table specs, 6. run directories, 7. data identity, 8. the SLURM launcher's submission.

Every CLI case runs in a scratch working folder holding the dataset cache, and must end with exit
status 2, one line on stderr naming the culprit, and the whole folder unchanged.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import stat
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import DIGITS, RECIPES, REPO, TINY, lift_published_checksums, make_run, shrink_official_sizes

from imgclf import catalog, config as C, runs
from imgclf.cli import main
from imgclf.data import DataError, load, readers
from imgclf.tables import plan as P, report, spec as S
from imgclf.utils import InputError, clip, parse_yaml, read_json_object

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- harness
def _tree(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "node"
    return out


def refused(work: Path, capsys, argv: list[str], *expect: str) -> str:
    """Run the CLI; assert exit 2, one stderr line holding ``expect``, and nothing written."""
    before = _tree(work)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err[-500:]
    assert len(lines) == 1, err[-800:]
    for e in expect:
        assert e in lines[0], lines[0]
    assert len(lines[0]) < 700, f"message of {len(lines[0])} characters"
    assert _tree(work) == before, "a refused command changed the working folder"
    return lines[0]


def digits_train(*overrides, out="results/runs/x/seed0", config=DIGITS) -> list[str]:
    return ["train", "--config", str(config), "--output-dir", out, "--quiet", *map(str, overrides)]


def tiny(**extra) -> list[str]:
    return [str(x) for kv in {**TINY, "scheduler.epochs": 1, **extra}.items() for x in kv]


def idx_bytes(dims: list[int], payload: bytes | None = None) -> bytes:
    head = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + (bytes(int(np.prod(dims))) if payload is None else payload)


def write_recipe(path: Path, **mods) -> Path:
    data = yaml.safe_load(DIGITS.read_text())
    for key, value in mods.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return path


# =========================================================================== 1. resource bombs
def test_yaml_alias_bomb_in_a_recipe(work, capsys):
    (work / "bomb.yaml").write_text(BOMB)
    refused(work, capsys, digits_train(config=work / "bomb.yaml"), "bomb.yaml", "alias bomb")


def test_yaml_alias_bomb_in_a_table_spec(work, capsys):
    # A valid spec whose free-text 'description' holds the bomb: nothing checks that key's content.
    body = "title: T\nrows: [{id: r, label: L, recipe: digits/resnet_preact.yaml}]\ndescription:\n"
    (work / "bomb_table.yaml").write_text(body + "".join(f"  {line}\n" for line in BOMB.splitlines()))
    refused(work, capsys, ["table", work / "bomb_table.yaml", "--partial", "--recipes", RECIPES],
            "bomb_table.yaml", "alias")


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "train: &t {x: *t}\n", "a: &a [[1, [2, *a]]]\n"],
                         ids=["list", "mapping", "nested"])
def test_recursive_yaml_alias(work, capsys, text):
    (work / "loop.yaml").write_text(text)
    refused(work, capsys, digits_train(config=work / "loop.yaml"), "loop.yaml", "recursive YAML alias")


def test_alias_bomb_in_an_override_value(work, capsys):
    value = "[" + ", ".join(["*a"] * 3) + "]"
    refused(work, capsys, [*digits_train("train.seed", "&a [1]"), "model.vgg.n_channels", value], "alias")
    # An anchor used within budget is fine: a single override value with one alias.
    assert C.parse_scalar("[&a 1, *a]") == [1, 1]


def test_alias_budget_allows_ordinary_anchors_and_counts_expansion():
    # yaml.safe_dump writes anchors for shared objects: such specs stay readable.
    shared = {"k": 1}
    assert parse_yaml(yaml.safe_dump([shared, shared]), "x.yaml") == [shared, shared]
    with pytest.raises(InputError, match="expand beyond"):
        parse_yaml(BOMB, "x.yaml")


def test_deeply_nested_and_huge_yaml(work, capsys):
    (work / "deep.yaml").write_text("a: " + "[" * 50000 + "]" * 50000 + "\n")
    refused(work, capsys, digits_train(config=work / "deep.yaml"), "deep.yaml")
    (work / "huge.yaml").write_text("# padding\n" * 200_000)
    refused(work, capsys, digits_train(config=work / "huge.yaml"), "huge.yaml", "too large")


def test_gzip_bomb_in_an_idx_file(work, capsys, monkeypatch):
    # The limit is the official file's size (47 MB for MNIST's training images); shrunk here so that
    # the bomb (10 MB of zeros in 10 KB) is quick to build.
    shrink_official_sizes(monkeypatch, "idx", 100, 100)
    data = work / "data" / "mnist"
    data.mkdir(parents=True)
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(10_000_000), compresslevel=1))
    refused(work, capsys, digits_train("dataset.name", "MNIST"), "train-images-idx3-ubyte.gz", "gzip bomb")


@pytest.mark.parametrize("dims, payload", [([2**31, 2**31, 16], 0), ([2**31, 2**31, 16], 64),
                                           ([2**32 - 1, 2**16, 2**16], 64), ([0, 28, 28], 64)],
                         ids=["2^31x2^31x16-wraps-to-0", "2^31x2^31x16", "huge", "empty"])
def test_idx_header_claiming_huge_counts(work, capsys, dims, payload):
    # 2^31 * 2^31 * 16 = 2^66 wraps to 0 in int64: with no payload, a wrapping size check passes it.
    data = work / "data" / "kmnist"
    data.mkdir(parents=True)
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in dims)
    (data / "train-images-idx3-ubyte").write_bytes(header + bytes(payload))
    refused(work, capsys, digits_train("dataset.name", "KMNIST"), "train-images-idx3-ubyte",
            "does not match its header")


def test_oversized_plain_idx_file_is_refused_before_reading(tmp_path, monkeypatch):
    shrink_official_sizes(monkeypatch, "idx", 2, 2)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes([5000]))
    with pytest.raises(DataError, match="more than the 10 of an official train-labels-idx1-ubyte"):
        readers._open_idx(tmp_path, "MNIST", "train-labels-idx1-ubyte")


@pytest.mark.parametrize("link", ["..", ".", "/"], ids=["parent", "self", "root"])
def test_data_from_a_folder_with_directory_symlinks(work, capsys, link):
    src = work / "src" / "cifar10"
    (src / "train" / "cat").mkdir(parents=True)
    (src / "test" / "cat").mkdir(parents=True)
    os.symlink(link, src / "train" / "cat" / "loop")
    out = refused(work, capsys, ["data", "cifar10", "--root", work / "root", "--from", work / "src"],
                  "symbolic link to a directory")
    assert "train/cat/loop" in out
    assert not (work / "root" / "cifar10").exists()


# =========================================================================== 2. ranges
RANGE_CASES = [
    ({"train.log_period": 0}, "train.log_period"),
    ({"model.resnet_preact.initial_channels": 0}, "model.resnet_preact.initial_channels"),
    ({"train.base_lr": 1e308}, "train.base_lr"),
    ({"train.base_lr": 1e10}, "train.base_lr"),
    ({"train.seed": 10**23}, "train.seed"),
    ({"train.seed": -1}, "train.seed"),
    ({"augmentation.random_crop.padding": -2}, "augmentation.random_crop.padding"),
    ({"scheduler.lr_decay": -0.1}, "scheduler.lr_decay"),
    ({"dataset.n_channels": 3}, "dataset.n_channels"),
    ({"dataset.image_size": 32}, "dataset.image_size"),
    ({"dataset.n_classes": 5}, "dataset.n_classes"),
    ({"model.resnet_preact.depth": 21}, "model.resnet_preact.depth"),
    ({"model.name": "wrn", "model.wrn.depth": 27}, "model.wrn.depth"),
    ({"model.name": "densenet", "model.densenet.depth": 16, "model.densenet.growth_rate": 0},
     "model.densenet.growth_rate"),
    ({"model.name": "pyramidnet", "model.pyramidnet.depth": 21, "model.pyramidnet.block_type": "bottleneck"},
     "model.pyramidnet.depth"),
    ({"train.momentum": 1.5}, "train.momentum"),
    ({"augmentation.random_crop.fill": 300}, "augmentation.random_crop.fill"),
    ({"scheduler.warmup.start_factor": 0.0}, "scheduler.warmup.start_factor"),
    ({"scheduler.T_mul": 0.5}, "scheduler.T_mul"),
    ({"train.dist.world_size": -5}, "train.dist.world_size"),
    ({"optim.adam.betas": [0.9, 1.0]}, "optim.adam.betas"),
    ({"scheduler.milestones": [-1, 2]}, "scheduler.milestones"),
    ({"train.weight_decay": 1e12}, "train.weight_decay"),
]


@pytest.mark.parametrize("mods, key", RANGE_CASES, ids=[k for _, k in RANGE_CASES])
def test_out_of_range_values_are_refused_at_resolution(mods, key):
    with pytest.raises(C.ConfigError, match=re.escape(key)) as e:
        C.build(DIGITS, mods)
    assert len(str(e.value)) < 250


@pytest.mark.parametrize("mods, key", RANGE_CASES[:8], ids=[k for _, k in RANGE_CASES[:8]])
def test_out_of_range_values_through_the_cli_write_nothing(work, capsys, mods, key):
    refused(work, capsys, digits_train(*[x for kv in mods.items() for x in map(str, kv)]), key)


def test_device_without_its_backend_is_one_line(work, capsys):
    assert not torch.backends.mps.is_available()
    refused(work, capsys, digits_train("device", "mps", *tiny()), "device", "mps", "not available")
    if not torch.cuda.is_available():
        refused(work, capsys, digits_train("device", "cuda:3", *tiny()), "device", "cuda:3")


@pytest.mark.parametrize("family, blocks", [
    ("resnet", ("basic", "bottleneck")), ("resnet_preact", ("basic", "bottleneck")),
    ("se_resnet_preact", ("basic", "bottleneck")), ("pyramidnet", ("basic", "bottleneck")),
    ("densenet", ("basic", "bottleneck")), ("wrn", ("",)), ("resnext", ("",)), ("shake_shake", ("",))])
def test_a_depth_resolves_exactly_when_its_builder_builds_it(family, blocks):
    """Every depth up to 40: resolution refuses it (naming the key) exactly when the builder would."""
    from imgclf.models import build

    small = {"initial_channels": 4, "widening_factor": 1, "growth_rate": 2, "alpha": 4, "cardinality": 2,
             "base_channels": 2}
    for block in blocks:
        for depth in range(1, 41):
            mods = {"model.name": family, f"model.{family}.depth": depth}
            opts = C.Config().model.__getattribute__(family)
            mods.update({f"model.{family}.{k}": v for k, v in small.items() if hasattr(opts, k)})
            if block:
                mods[f"model.{family}.block_type"] = block
            try:
                cfg = C.build(DIGITS, mods)
                resolves = True
            except C.ConfigError as e:
                assert f"model.{family}.depth" in str(e)
                resolves = False
            cfg_for_builder = C.Config()
            for k, v in mods.items():
                C.set_key(cfg_for_builder, k, v)
            try:
                with torch.device("meta"):
                    build(cfg_for_builder, in_channels=1, n_classes=10)
                builds = True
            except ValueError:
                builds = False
            assert resolves == builds, (family, block, depth)


def _tables(tmp: Path, rows: list[dict], **top) -> Path:
    d = tmp / "tables"
    d.mkdir(exist_ok=True)
    (d / "t.yaml").write_text(yaml.safe_dump({"title": "T", "seeds": [0], **top, "rows": rows}, sort_keys=False))
    return d


@pytest.mark.parametrize("overrides, key", [
    ({"model.resnet_preact.depth": 21}, "model.resnet_preact.depth"),
    ({"train.log_period": 0}, "train.log_period"),
    ({"model.resnet_preact.initial_channels": 0}, "model.resnet_preact.initial_channels"),
    ({"dataset.n_channels": 3}, "dataset.n_channels"),
    ({"scheduler.lr_decay": -1.0}, "scheduler.lr_decay"),
])
def test_plan_refuses_an_impossible_row_naming_row_and_key(tmp_path, overrides, key):
    rows = [{"id": "fine", "label": "ok", "recipe": "digits/resnet_preact.yaml"},
            {"id": "impossible_row", "label": "bad", "recipe": "digits/resnet_preact.yaml", "overrides": overrides}]
    with pytest.raises(S.SpecError) as e:
        P.Plan.from_dir(_tables(tmp_path, rows), RECIPES)
    assert "t.yaml" in str(e.value) and "row 'impossible_row'" in str(e.value) and key in str(e.value)


def test_snakemake_dry_run_refuses_an_impossible_row_and_a_bombed_config(tmp_path):
    """The workflow resolves every row at planning: `snakemake -n` names the row and the key."""
    import shutil
    import subprocess
    import sys

    project = tmp_path / "project"
    shutil.copytree(REPO / "config" / "recipes", project / "config" / "recipes")
    rows = [{"id": "depth21", "label": "ResNet-preact-21", "recipe": "digits/resnet_preact.yaml",
             "overrides": {"model.resnet_preact.depth": 21}}]
    _tables(project / "config", rows)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["tables"] = ["t"]
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "-n",
           "--cores", "1", "--directory", str(project)]
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(project / "resources" / "cache")}
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "row 'depth21'" in text and "model.resnet_preact.depth: 21 is not 6n+2" in text, text[-2000:]
    assert "Traceback" not in text
    (project / "config" / "config.yaml").write_text(BOMB)
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "config/config.yaml" in text and "alias" in text, text[-2000:]
    assert "MemoryError" not in text and "Traceback" not in text
    assert not (project / "results").exists() and not (project / "resources").exists()


# =========================================================================== 3. undecodable files
@pytest.mark.parametrize("content, expect", [
    ("train:\n  base_lr: 0.1\n".encode("utf-16"), "UTF-16"),
    (b"train:\n  base_lr: \xff\xfe\x80 0.1\n", "not UTF-8 text"),
    (bytes(range(256)) * 4, "binary data"),
    (b"\x89PNG\r\n\x1a\n" + bytes(100), "binary data"),
    (b"\x1f\x8b\x08\x01" + b"\x01" * 50 + b"\xc3\x28", "not UTF-8"),
], ids=["utf16", "latin1-bytes", "binary", "png", "gzip"])
def test_undecodable_recipe_names_the_file_and_what_was_expected(work, capsys, content, expect):
    (work / "r.yaml").write_bytes(content)
    line = refused(work, capsys, digits_train(config=work / "r.yaml"), "r.yaml", expect, "YAML")
    assert "codec can't decode" not in line


def test_undecodable_table_spec(work, capsys):
    (work / "t.yaml").write_bytes("title: x\nrows: []\n".encode("utf-16-le"))
    refused(work, capsys, ["table", work / "t.yaml", "--partial", "--recipes", RECIPES], "t.yaml", "UTF-8")


def test_undecodable_run_config_and_result(work, capsys):
    run = make_run(work / "results" / "runs" / "r" / "seed0")
    (run / "result.json").write_text("{}")
    (run / "model.pt").write_bytes(b"x")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_bytes("device: cpu\n".encode("utf-16"))
    refused(work, capsys, ["evaluate", "--run", run], "seed0/config.yaml", "UTF-16")
    (run / "config.yaml").write_text(text)
    for garbage, expect in ((b"\x00\x01garbage", "binary data"), (b"not json at all", "not valid JSON at line 1"),
                            (b'{"test_error": 1', "not valid JSON"), ("[1, 2]".encode(), "holds a JSON list")):
        (run / "result.json").write_bytes(garbage)
        line = refused(work, capsys, ["evaluate", "--run", run], "result.json", expect)
        assert "Expecting value" not in line


@pytest.mark.parametrize("argv", [
    ["train.optimizer", "x" * 5_000_000],
    ["model.name", "resnet" * 1_000_000],
    ["k" * 5_000_000, "1"],
    ["train.base_lr", "[" + "1, " * 1_000_000 + "1]"],
    ["train.batch_size", "'" + "9" * 1_000_000 + "'"],
], ids=["choice", "model", "key", "list", "string"])
def test_echoed_values_are_cut(work, capsys, argv):
    line = refused(work, capsys, digits_train(*argv))
    assert len(line) < 400, len(line)


def test_clip():
    assert clip("short") == "'short'"
    assert len(clip("y" * 10_000_000)) == 40 and clip("y" * 100).endswith("…")
    assert len(clip(list(range(10**5)))) == 40


# =========================================================================== 4. no state after a refusal
def test_refused_run_leaves_nothing_and_the_corrected_command_trains_and_evaluates(work, capsys):
    """The issue's sequence: refused (initial_channels 0, seed 1e23, a world size it cannot launch),
    then corrected in the same folder; then the finished run is verified against its identity."""
    out = "results/runs/x/seed0"
    refused(work, capsys, digits_train(*tiny(**{"model.resnet_preact.initial_channels": 0}), out=out),
            "initial_channels")
    refused(work, capsys, digits_train(*tiny(**{"train.seed": 10**23}), out=out), "train.seed")
    refused(work, capsys, digits_train(*tiny(**{"train.dist.world_size": 4}), out=out), "world_size")
    # A refusal after the folder exists (a crash before the first checkpoint) is not a run either.
    make_run(work / out, **{"model.resnet_preact.initial_channels": 4})
    assert main(digits_train(*tiny(), out=out)) == 0
    assert (work / out / "result.json").is_file()
    assert main(["evaluate", "--run", out]) == 0
    first = json.loads((work / out / "eval.json").read_text())
    # 6. Editing config.yaml after the run: evaluate refuses instead of rewriting eval.json.
    cfg_path = work / out / "config.yaml"
    original = cfg_path.read_text()
    cfg_path.write_text(original.replace("base_lr: 0.1", "base_lr: 0.3"))
    refused(work, capsys, ["evaluate", "--run", out], "config.yaml", "changed after the run")
    cfg_path.write_text(original.replace("seed: 0", "seed: 4"))
    refused(work, capsys, ["evaluate", "--run", out], "config.yaml")
    cfg_path.write_text(original)
    assert main(["evaluate", "--run", out]) == 0
    assert json.loads((work / out / "eval.json").read_text())["test_error"] == first["test_error"]


def test_a_folder_without_a_checkpoint_is_not_a_run(tmp_path):
    run = make_run(tmp_path / "r", **{"train.seed": 3})
    assert not runs.has_run(run)
    runs.prepare(C.build(DIGITS, TINY), run, resume=False)  # replaced, not refused
    assert C.from_dict(yaml.safe_load((run / "config.yaml").read_text())).train.seed == 0
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "model.pt", "result.json"):
        (run / name).write_bytes(b"x")
        with pytest.raises(C.ConfigError, match="different config"):
            runs.prepare(C.build(DIGITS, {**TINY, "train.seed": 3}), run, resume=True)
        (run / name).unlink()


def test_dataset_cache_is_not_written_for_a_refused_command(work, capsys):
    # Refused by the checks that need the data (batch larger than the 1,347 training digits).
    refused(work, capsys, digits_train(*tiny(**{"train.batch_size": 4096})), "train.batch_size", "1347")
    # ... and by a run folder that holds another run.
    make_run(work / "results/runs/x/seed0")
    (work / "results/runs/x/seed0/checkpoint.pt").write_bytes(b"x")
    refused(work, capsys, digits_train(*tiny(**{"train.base_lr": 0.2})), "different config")
    assert not (work / "resources").exists()


def _cifar_folder(root: Path, classes, size=32, n=(5, 1)) -> None:
    from torchvision.io import write_png

    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "test"), n):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    write_png(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                              str(root / split / cls / f"{i}.png"))


def _tgz(path: Path, folder: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar10")
    return path


@pytest.fixture
def small_cifar(monkeypatch):
    shrink_official_sizes(monkeypatch, "cifar", 50, 10)


def test_refused_archive_is_rolled_back_and_a_good_one_then_works(work, capsys, small_cifar):
    _cifar_folder(work / "fake", ["cat", "dog"], size=4)
    _cifar_folder(work / "good", CIFAR10_CLASSES)
    fake, good = _tgz(work / "fake.tgz", work / "fake"), _tgz(work / "good.tgz", work / "good")
    refused(work, capsys, ["data", "cifar10", "--root", work / "root", "--from", fake], "2 class folders")
    assert not (work / "root" / "cifar10").exists()
    assert main(["data", "cifar10", "--root", str(work / "root"), "--from", str(good)]) == 0
    assert sorted(p.name for p in (work / "root" / "cifar10" / "train").iterdir()) == CIFAR10_CLASSES
    # A refused folder source is rolled back the same way.
    refused(work, capsys, ["data", "cifar10", "--root", work / "root2", "--from", work / "fake"], "CIFAR10")
    assert not (work / "root2" / "cifar10").exists()


def test_refused_dataset_writes_no_cache(work, capsys):
    d = work / "data" / "kmnist"
    d.mkdir(parents=True)
    for stem, dims in (("train-images-idx3-ubyte", [60000, 28, 28]), ("train-labels-idx1-ubyte", [60000]),
                       ("t10k-images-idx3-ubyte", [10000, 28, 28]), ("t10k-labels-idx1-ubyte", [10000])):
        (d / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(dims), compresslevel=1))
    refused(work, capsys, digits_train("dataset.name", "KMNIST"), "train-images-idx3-ubyte.gz", "MD5")
    refused(work, capsys, ["data", "kmnist"], "MD5")
    assert not (work / "resources").exists()


# =========================================================================== 5. table specs
ROW = {"id": "r", "label": "ResNet", "recipe": "digits/resnet_preact.yaml", "overrides": dict(TINY)}


def _spec(tmp: Path, rows: list[dict], **top) -> Path:
    path = tmp / "t.yaml"
    path.write_text(yaml.safe_dump({"title": "T", "seeds": [0, 1], **top, "rows": rows}, sort_keys=False))
    return path


def _finish(runs_dir: Path, run_id: str, seed: int, test_error, **extra) -> None:
    d = runs_dir / run_id / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps({"test_error": test_error, "train_seconds": 12.0, **extra}))


@pytest.mark.parametrize("reported", [
    {"result": "N/A"}, {"result": "6.4*", "result_text": 7}, {"result": [1, 2]}, {"result": True},
    {"result": "6.47", "paper": {"a": 1}}, {"result_text": 5.5, "epochs": "many", "time": 3},
], ids=["na", "star", "list", "bool", "numeric-text", "types"])
def test_non_numeric_reported_values_render(tmp_path, reported):
    table = S.load(_spec(tmp_path, [{**ROW, "reported": reported}]), RECIPES)
    _finish(tmp_path / "runs", table.rows[0].run_id, 0, 5.0)
    _finish(tmp_path / "runs", table.rows[0].run_id, 1, 7.0)
    frame = report.aggregate(table, tmp_path / "runs")
    md = report.render_markdown(table, frame)
    (tmp_path / "t.csv").write_text(report.to_csv(frame))
    back = report.read_csv(tmp_path / "t.csv")
    assert report.render_markdown(table, back) == md
    line = md.splitlines()[4]
    assert "| 6.00 " in line
    if reported.get("result") == "6.47":
        assert "| -0.47 " in line  # a number written as text still makes the difference


@pytest.mark.parametrize("seeds", [[0, 0, 0], [1, 2, 1], [0, 2**40], [0, True]])
def test_duplicate_or_impossible_seeds_refused(tmp_path, seeds):
    with pytest.raises(S.SpecError, match="distinct integers"):
        S.load(_spec(tmp_path, [ROW], seeds=seeds), RECIPES)
    with pytest.raises(S.SpecError, match="row 'r'.*distinct integers"):
        S.load(_spec(tmp_path, [{**ROW, "seeds": seeds}]), RECIPES)


def test_rows_differing_only_in_dataset_dir_are_different_runs(tmp_path):
    rows = [{**ROW, "id": "a", "overrides": {**TINY, "dataset.dataset_dir": "data/a"}},
            {**ROW, "id": "b", "overrides": {**TINY, "dataset.dataset_dir": "data/b"}},
            {**ROW, "id": "c", "overrides": dict(TINY)}]
    table = S.load(_spec(tmp_path, rows), RECIPES)
    assert len({r.run_id for r in table.rows}) == 3
    # Without dataset_dir the run id is what it always was (no shipped run changes its id).
    assert table.rows[2].run_id == runs.run_id(C.build(DIGITS, TINY))
    assert C.config_hash(C.build(DIGITS, {**TINY, "dataset.dataset_dir": ""})) == C.config_hash(C.build(DIGITS, TINY))


@pytest.mark.parametrize("label", ["a | b", "|", "x\\|y", "two\nlines", "pipe|and\nnewline"])
def test_labels_and_cells_cannot_break_the_markdown_table(tmp_path, label):
    table = S.load(_spec(tmp_path, [{**ROW, "label": label, "cells": {"Note": label},
                                     "reported": {"paper": label}}], columns=["Note"]), RECIPES)
    md = report.render_markdown(table, report.aggregate(table, tmp_path / "runs", partial=True))
    lines = md.splitlines()[2:]
    header, body = lines[0], lines[2:]
    assert len(body) == 1
    columns = len(re.split(r"(?<!\\)\|", header))
    assert len(re.split(r"(?<!\\)\|", body[0])) == columns


@pytest.mark.parametrize("value", [-12.5, 100.5, "5.0", None, True, float("inf")],
                         ids=["negative", "over-100", "string", "null-not-diverged", "bool", "inf"])
def test_impossible_test_error_counts_as_not_finished(tmp_path, value):
    table = S.load(_spec(tmp_path, [ROW]), RECIPES)
    rid = table.rows[0].run_id
    _finish(tmp_path / "runs", rid, 0, 4.0)
    d = tmp_path / "runs" / rid / "seed1"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"test_error": value}).replace("Infinity", "1e999"))
    frame = report.aggregate(table, tmp_path / "runs", partial=True)
    rec = report.frame_records(frame)[0]
    assert rec["n_done"] == 1 and rec["test_error_median"] == 4.0
    assert "-12.50" not in report.render_markdown(table, frame)
    with pytest.raises(FileNotFoundError, match="impossible result"):
        report.aggregate(table, tmp_path / "runs")


# =========================================================================== 6. run directories
def _fake_finished(run: Path, **result) -> Path:
    make_run(run)
    cfg = C.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    (run / "result.json").write_text(json.dumps({"test_error": 5.0, "config_hash": C.config_hash(cfg),
                                                 "seed": cfg.train.seed, **result}))
    return run


@pytest.mark.parametrize("result", ["[]", "[1, 2]", '"text"', "3", "null"])
def test_result_json_that_is_not_an_object(work, capsys, result):
    run = make_run(work / "results" / "runs" / "r" / "seed0")
    (run / "result.json").write_text(result)
    (run / "model.pt").write_bytes(b"x")
    line = refused(work, capsys, ["evaluate", "--run", run], "result.json", "expected")
    assert "AttributeError" not in line


@pytest.mark.parametrize("edit, expect", [
    (("base_lr: 0.1", "base_lr: 0.2"), "changed after the run"),
    (("depth: 8", "depth: 14"), "changed after the run"),
    (("seed: 0", "seed: 1"), "train.seed 1 differs"),
    (("use_random_crop: true", "use_random_crop: false"), "changed after the run"),
])
def test_edited_config_after_the_run_is_refused_by_evaluate(work, capsys, edit, expect):
    run = _fake_finished(work / "results" / "runs" / "r" / "seed0")
    (run / "model.pt").write_bytes(b"x")
    (run / "eval.json").write_text('{"test_error": 5.0}')
    text = (run / "config.yaml").read_text()
    assert edit[0] in text
    (run / "config.yaml").write_text(text.replace(edit[0], edit[1]))
    refused(work, capsys, ["evaluate", "--run", run], "config.yaml", expect)


def test_run_folder_names_are_part_of_the_identity(work, capsys):
    cfg = C.build(DIGITS, TINY)
    wrong_id = work / "results" / "runs" / "digits-resnet_preact-deadbeef" / "seed0"
    make_run(wrong_id)
    (wrong_id / "result.json").write_text('{"test_error": 5.0}')
    refused(work, capsys, ["evaluate", "--run", wrong_id], "digits-resnet_preact-deadbeef", runs.run_id(cfg))
    wrong_seed = work / "results" / "runs" / runs.run_id(cfg) / "seed7"
    make_run(wrong_seed)
    (wrong_seed / "result.json").write_text('{"test_error": 5.0}')
    refused(work, capsys, ["evaluate", "--run", wrong_seed], "seed7", "train.seed 0")


def _kmnist(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for prefix, n in (("train", 20), ("t10k", 8)):
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes([n, 28, 28], rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            idx_bytes([n], rng.integers(0, 10, n, dtype=np.uint8).tobytes()))


@pytest.fixture
def generated_kmnist(monkeypatch):
    shrink_official_sizes(monkeypatch, "idx", 20, 8)
    lift_published_checksums(monkeypatch, "KMNIST")


def test_cache_is_keyed_by_its_source_folder(work, generated_kmnist):
    _kmnist(work / "a", 1)
    first = load("KMNIST", folder=work / "a")
    for nowhere in (work / "nowhere", work / "a" / "sub", work / "b"):
        with pytest.raises(DataError, match="not found"):
            load("KMNIST", folder=nowhere)
    # The folder it was decoded from still answers, even once its files are gone.
    for f in (work / "a").iterdir():
        f.unlink()
    (work / "a").rmdir()
    assert torch.equal(load("KMNIST", folder=work / "a").train_images, first.train_images)
    # Another folder with the same name under another root is another dataset.
    _kmnist(work / "b", 2)
    assert not torch.equal(load("KMNIST", folder=work / "b").train_images, first.train_images)


def test_cache_written_only_when_asked(work, generated_kmnist):
    from imgclf.data import cache_path, store

    _kmnist(work / "a", 1)
    d = load("KMNIST", folder=work / "a", write_cache=False)
    assert not cache_path("KMNIST").exists()
    store(d, work / "a")
    assert cache_path("KMNIST").is_file()
    again = load("KMNIST", folder=work / "a")
    assert again.cached and torch.equal(again.train_images, d.train_images)


# =========================================================================== 7. data identity
def _jpeg_folder(root: Path) -> Path:
    from torchvision.io import write_jpeg

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                write_jpeg(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
                           str(root / split / cls / "0.jpg"))
    return root / "train" / "b" / "0.jpg"


@pytest.mark.parametrize("seed", range(5))
def test_corrupt_jpeg_is_an_error_not_garbage(tmp_path, seed):
    import random

    f = _jpeg_folder(tmp_path)
    assert readers.read_image_folder(tmp_path)["train"][0].shape == (2, 3, 32, 32)
    raw = bytearray(f.read_bytes())
    sos = raw.index(b"\xff\xda")
    r = random.Random(seed)
    for _ in range(5):
        raw[r.randrange(sos + 20, len(raw) - 2)] = r.randrange(256)
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt image data|cannot decode") as e:
        readers.read_image_folder(tmp_path)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("classes, size, n, expect", [
    (["cat", "dog"], 4, (5, 1), "2 class folders, but CIFAR10 has 10"),
    (CIFAR10_CLASSES, 4, (5, 1), "are 3x4x4, but CIFAR10's are 3x32x32"),
    (CIFAR10_CLASSES, 32, (4, 1), "40 images, expected CIFAR10's official 50"),
    (CIFAR10_CLASSES, 32, (5, 2), "20 images, expected CIFAR10's official 10"),
    (CIFAR10_CLASSES[:5], 32, (10, 2), "5 class folders"),
], ids=["two-classes", "4x4", "short-train", "long-test", "five-classes"])
def test_fake_cifar_image_folder_is_refused(tmp_path, small_cifar, classes, size, n, expect):
    _cifar_folder(tmp_path / "cifar10", classes, size=size, n=n)
    with pytest.raises(DataError, match=re.escape(expect)):
        load("CIFAR10", folder=tmp_path / "cifar10", use_cache=False)


def test_kmnist_checksums_are_the_published_ones():
    """The README says KMNIST is MD5-checked: against the MD5s published with its release (as
    torchvision's downloader lists them)."""
    from torchvision.datasets import KMNIST

    published = {name.removesuffix(".gz"): md5 for name, md5 in KMNIST.resources}
    assert catalog.DATASETS["KMNIST"].gz_md5 == published
    assert len(published) == 4


def test_fake_kmnist_is_refused(tmp_path, monkeypatch):
    """Well-formed but not the release: refused by checksum, gzip or not."""
    shrink_official_sizes(monkeypatch, "idx", 20, 8)
    _kmnist(tmp_path / "plain", 0)
    with pytest.raises(DataError, match="published MD5s of its released .gz files"):
        readers.read_idx(tmp_path / "plain", "KMNIST")
    gz = tmp_path / "gz"
    gz.mkdir()
    for f in (tmp_path / "plain").iterdir():
        (gz / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
    with pytest.raises(DataError, match="published bdb82020997e1d708af4cf47b453dcf7"):
        readers.read_idx(gz, "KMNIST")


def test_real_idx_datasets_pass_their_checksums(data_root):
    for name, folder in (("MNIST", "mnist"), ("FashionMNIST", "fashion_mnist")):
        if (data_root / folder).is_dir():
            d = readers.read_idx(data_root / folder, name)
            assert d["train"][0].shape == (60000, 1, 28, 28)


# =========================================================================== 8. the SLURM launcher
@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(script: str | None) -> None:
        for f in bin_dir.iterdir():
            f.unlink()
        if script is not None:  # submitit looks for srun before it submits
            for name, text in (("sbatch", script), ("srun", "exit 0\n")):
                f = bin_dir / name
                f.write_text("#!/bin/sh\n" + text)
                f.chmod(f.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", str(bin_dir))  # this machine may have a real sbatch in /usr/bin
    return install


@pytest.mark.parametrize("script, expect", [
    ("echo 'sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)' >&2"
     "\nexit 1\n", "Unable to contact slurm controller"),
    ("exit 1\n", "submission with launcher slurm failed"),
    ("echo 'line one' >&2\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n",
     "invalid partition specified"),
    ("echo 'no job id here'\nexit 0\n", "job_id"),
    (None, "srun"),
], ids=["unreachable", "silent", "multi-line", "garbage-output", "absent"])
def test_sbatch_failure_is_one_line(work, capsys, fake_sbatch, script, expect):
    fake_sbatch(script)
    out = "results/runs/x/seed0"
    capsys.readouterr()
    rc = main(digits_train(*tiny(), out=out)[:1] + ["--launcher", "slurm"] + digits_train(*tiny(), out=out)[1:])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert "Traceback" not in err
    # Nothing there is a run: the next (corrected) command is not refused by the leftover folder.
    assert not runs.has_run(work / out)
    runs.check_target(C.build(DIGITS, {**TINY, "train.base_lr": 0.2}), work / out, resume=False)


# =========================================================================== README promises
# The README and the manuals it links (docs/): the promises and the plan sentence live there.
README = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])


def test_readme_plan_counts_are_the_plan():
    m = re.search(r"(\d+) tables, (\d+) rows \((\d+) distinct runs, (\d+) run-seeds\); `snakemake --profile slurm -n all_tables` "
                  r"plans them all\s+\((\d+) jobs", README)
    assert m, "the README's plan sentence changed; update this test"
    tables, rows, runs_, seeds, jobs = map(int, m.groups())
    plan = P.Plan.from_dir(REPO / "config" / "tables", RECIPES)
    assert len(plan.tables) == tables
    assert sum(len(t.rows) for t in plan.tables.values()) == rows
    assert len(plan.runs) == runs_
    assert sum(len(r.seeds) for r in plan.runs.values()) == seeds
    # all_tables: one train job per run-seed, aggregate + render + plots per table, one data job
    # per dataset the runs read, and the target rule itself.
    datasets = {r.dataset for r in plan.runs.values()}
    assert seeds + 3 * tables + len(datasets) + 1 == jobs


def test_readme_table_of_tables_matches_the_specs():
    plan = P.Plan.from_dir(REPO / "config" / "tables", RECIPES)
    section = README.split("### The tables", 1)[1].split("###", 1)[0]
    checked = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z0-9_*]+)`", cells[0])
        groups = [[n for n in sorted(plan.tables) if re.fullmatch(pat.replace("*", ".*"), n)] for pat in names]
        count = re.search(r"\((\d+) tables\)", cells[0])
        if count:
            assert len(groups[0]) == int(count.group(1)), cells[0]
        paper_only = re.search(r"\((\d+) paper-only\)", cells[1])
        if paper_only:
            assert sum(not r.train for r in plan.tables[groups[0][0]].rows) == int(paper_only.group(1))
        row_text = [x.strip() for x in re.sub(r"\(.*?\)", "", cells[1]).split(",")]
        seed_text = [x.strip() for x in cells[2].split(",")]
        for i, tables in enumerate(groups):
            assert tables, cells[0]
            rows = [len(plan.tables[t].rows) for t in tables]
            want = row_text[i if len(row_text) == len(groups) else 0]
            if "–" in want:
                lo, hi = map(int, want.split("–"))
                assert (min(rows), max(rows)) == (lo, hi), cells[0]
            else:
                assert set(rows) == {int(want)}, cells[0]
            seeds = {len(plan.tables[t].seeds) for t in tables}
            assert seeds == {int(seed_text[i if len(seed_text) == len(groups) else 0])}, cells[0]
            checked += len(tables)
    assert checked == len(plan.tables)


def test_readme_bad_input_corpus_size():
    spec = importlib.util.spec_from_file_location("bad_input_corpus", Path(__file__).with_name("test_bad_input.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    m = re.search(r"a corpus of (\d+) malformed inputs", README)
    assert m and int(m.group(1)) == len(module.CASES) + len(module.SUBPROCESS)


def test_readme_reliability_promises_are_tested_here():
    """Each promise of the bad-input manual (docs/robustness.md) names the test that holds it to its word."""
    section = (REPO / "docs" / "robustness.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", section))
    # the tests of tests/faults/, this module's and its neighbours' (test_messages.py, ...)
    here = {name for path in Path(__file__).parent.glob("test_*.py")
            for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert named and named <= here, sorted(named - here)
