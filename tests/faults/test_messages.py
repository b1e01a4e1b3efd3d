"""Messages that name something: every refusal names the key or option and the file, shows control
characters escaped, and a recipe, table spec or settings file is read with duplicate keys refused
and its values range-checked only once the command line has had its say.

Every CLI case runs in a scratch working folder and must end with exit status 2 and one stderr
line naming the culprit, with no raw control character in it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conftest import DIGITS, TINY

from imgclf import config as C
from imgclf.cli import main
from imgclf.launch import jobs
from imgclf.tables import spec as S
from imgclf.utils import InputError, read_text, read_yaml

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


def refused(capsys, argv: list[str], *expect: str) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err[-500:]
    assert len(lines) == 1, err[-800:]
    assert all(c.isprintable() for c in lines[0]), repr(lines[0])
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def tiny_train(*extra, out=None) -> list[str]:
    argv = ["train", "--config", str(DIGITS), "--quiet"] + (["--output-dir", str(out)] if out else [])
    return argv + [str(x) for kv in {**TINY, "scheduler.epochs": 1}.items() for x in kv] + [str(x) for x in extra]


# --------------------------------------------------------------------------- NUL bytes
@pytest.mark.parametrize("key", ["train.output_dir", "data_root", "dataset.dataset_dir", "train.checkpoint"])
def test_nul_byte_in_a_recipe_path_names_the_key_and_the_recipe(work, capsys, key):
    section, _, leaf = key.rpartition(".")
    body = f'{section}:\n  {leaf}: "runs\\0x"\n' if section else f'{leaf}: "runs\\0x"\n'
    recipe = work / "nul.yaml"
    recipe.write_text(body)
    line = refused(capsys, ["train", "--config", recipe, "--quiet"], key, str(recipe), "NUL", "\\x00")
    assert "embedded null byte" not in line


def test_nul_byte_in_an_override_names_the_override(work, capsys):
    refused(capsys, tiny_train("train.output_dir", "a\0b"), "override", "train.output_dir", "\\x00")


def test_nul_byte_in_a_recipe_path_is_shown_escaped(work):
    with pytest.raises(C.ConfigError, match=r"a\\x00b\.yaml: file not found"):
        C.build("a\0b.yaml")
    with pytest.raises(InputError, match=r"a\\x00b\.yaml: holds a NUL byte"):
        read_text("a\0b.yaml", "a recipe", 1000)


# --------------------------------------------------------------------------- symlinks
def test_output_dir_that_is_a_symlink_loop_is_named(work, capsys):
    os.symlink("loop", work / "loop")
    line = refused(capsys, tiny_train(out=work / "loop"), "--output-dir", "symlink loop", str(work / "loop"))
    assert "Errno" not in line
    assert not (work / "results").exists()


def test_output_dir_below_a_dangling_symlink_is_named(work, capsys):
    os.symlink(work / "gone", work / "runs")
    line = refused(capsys, tiny_train("train.output_dir", work / "runs" / "seed0"),
                   "train.output_dir", "dangling symlink", str(work / "runs"))
    assert "Errno" not in line


def test_data_root_that_is_a_symlink_loop_is_named(work, capsys):
    os.symlink("a", work / "b")
    os.symlink("b", work / "a")
    refused(capsys, tiny_train("data_root", work / "a", out=work / "run"), "data_root", "symlink loop")


# --------------------------------------------------------------------------- garbage JSON of other readers
def test_garbage_job_record_is_named_in_a_warning_not_dropped_silently(tmp_path, caplog):
    (tmp_path / jobs.RECORD).write_text("{garbage")
    with caplog.at_level(logging.WARNING):
        assert jobs.read_record(tmp_path) is None
    text = caplog.text
    assert str(tmp_path / jobs.RECORD) in text and "not valid JSON" in text, text
    (tmp_path / jobs.RECORD).write_text('["a list"]')
    assert jobs.read_record(tmp_path) is None
    assert "holds a JSON list" in caplog.text


def test_slurm_state_cache_of_another_shape_is_refreshed(tmp_path, monkeypatch):
    cache = tmp_path / "states.json"
    from imgclf.launch import slurm

    monkeypatch.setattr(slurm, "_cache_path", lambda: cache)
    monkeypatch.setattr(slurm, "_sacct", lambda *a: {"7": "RUNNING"})
    for garbage in ("[]", "{}", '{"time": "x", "states": []}', "{not json"):
        cache.write_text(garbage)
        assert slurm.slurm_states(["7"]) == {"7": "RUNNING"}, garbage


# --------------------------------------------------------------------------- overrides and keys
def test_alias_bomb_in_an_override_names_the_override():
    with pytest.raises(C.ConfigError) as e:
        C.parse_overrides(["scheduler.milestones", BOMB])
    assert "override 'scheduler.milestones'" in str(e.value) and "alias" in str(e.value)


def test_control_characters_of_an_unknown_key_are_escaped(work, capsys):
    line = refused(capsys, tiny_train("train.\x1b[2Jbase_lr", "0.1"), "unknown config key", "\\x1b[2J")
    assert "\x1b" not in line


def test_control_characters_in_a_recipe_file_name_are_escaped(work, capsys):
    recipe = work / "bad\rname.yaml"
    recipe.write_text("train: [1, 2\n")
    refused(capsys, ["train", "--config", recipe], "bad\\rname.yaml", "not valid YAML")


# --------------------------------------------------------------------------- duplicate keys
DUPLICATED = """\
train:
  batch_size: 64
  base_lr: 0.1
scheduler:
  epochs: 15
  epochs: 30
"""


def test_recipe_with_a_duplicated_key_is_refused_naming_key_and_lines(work, capsys):
    recipe = work / "dup.yaml"
    recipe.write_text(DUPLICATED)
    refused(capsys, ["train", "--config", recipe], str(recipe), "duplicate key 'epochs'", "lines 5 and 6")


def test_duplicated_top_level_section_is_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  seed: 1\nmodel:\n  name: wrn\ntrain:\n  seed: 2\n")
    with pytest.raises(InputError, match=r"config\.yaml \(line 5\).*duplicate key 'train' \(lines 1 and 5\)"):
        read_yaml(path)


def test_duplicated_key_in_a_flow_mapping_and_a_table_spec_is_refused(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("a: {x: 1, x: 2}\n")
    with pytest.raises(InputError, match="duplicate key 'x' \\(lines 1 and 1\\)"):
        read_yaml(path)
    spec = tmp_path / "table.yaml"
    spec.write_text("title: t\ntitle: u\nrows: []\n")
    with pytest.raises((S.SpecError, C.ConfigError), match="duplicate key 'title' \\(lines 1 and 2\\)"):
        S.load(spec, "config/recipes")


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nrow:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path)["row"] == {"x": 3, "y": 2}


# --------------------------------------------------------------------------- ranges on the resolved config
@pytest.mark.parametrize("key, bad, good", [
    ("train.seed", 10**23, 1),
    ("train.base_lr", "1e300", 0.05),
    ("augmentation.mixup.alpha", ".nan", 0.2),
])
def test_a_recipe_value_out_of_range_is_fixed_by_an_override(tmp_path, key, bad, good):
    section, leaf = key.rsplit(".", 1)
    lines, indent = [], ""
    for part in section.split("."):
        lines.append(f"{indent}{part}:")
        indent += "  "
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(lines + [f"{indent}{leaf}: {bad}"]) + "\n")
    cfg = C.build(recipe, {key: good})  # the resolved value is in range
    assert C.get_key(cfg, key) == good
    with pytest.raises(C.ConfigError) as e:  # the recipe alone still is refused, naming it and the key
        C.build(recipe)
    assert str(e.value).startswith(f"{recipe}: {key}:"), str(e.value)


def test_an_override_out_of_range_is_named_as_the_override():
    with pytest.raises(C.ConfigError, match=r"^override train\.seed: .* is out of range"):
        C.build(DIGITS, {"train.seed": 2**40})


def test_control_characters_of_a_value_that_is_not_a_choice_are_escaped():
    with pytest.raises(C.ConfigError) as e:
        C.build(DIGITS, {"train.optimizer": "sgd\x1b[2J"})
    assert "sgd\\x1b[2J" in str(e.value) and "\x1b" not in str(e.value)
