"""The plan's GPU-hours and priorities: from a calibration file's measured aggregate img/s where it
covers a run (one seed's GPU-hours at k = epochs x training images / aggregate img/s of k), else
from the reference README's reported times, said as such; `imgclf calibrate` writes that file."""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

DIGITS_TRAIN = 1347  # the digits' training split: every epoch trains on these
ONE_HOUR_OF_100_EPOCHS = 100 * DIGITS_TRAIN / 3600  # img/s at which 100 epochs take one GPU-hour


def _tables(tmp_path, k=None):
    """Two tables over three runs: 'cheap' (100 epochs, reported 1h, calibrated), 'dear' (reported
    2h30m, a model the calibration does not cover), 'other' (only in table 'b', reported 20m)."""
    tables = tmp_path / "tables"
    tables.mkdir(exist_ok=True)
    cheap = {"id": "cheap", "label": "x", "recipe": "digits/resnet_preact.yaml",
             "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 100}, "reported": {"time": "1h"}}
    if k:
        cheap["resources"] = {"seeds_per_gpu": k}
    dear = {"id": "dear", "label": "y", "recipe": "digits/resnet_preact.yaml",
            "overrides": {"model.resnet_preact.depth": 14, "scheduler.epochs": 100}, "reported": {"time": "2h30m"}}
    other = {"id": "other", "label": "z", "recipe": "digits/resnet_preact.yaml",
             "overrides": {"model.resnet_preact.depth": 8, "scheduler.epochs": 50}, "reported": {"time": "20m"}}
    (tables / "a.yaml").write_text(yaml.safe_dump({"title": "A", "seeds": [0, 1], "rows": [cheap, dear]}))
    (tables / "b.yaml").write_text(yaml.safe_dump({"title": "B", "seeds": [0, 1], "rows": [cheap, other]}))
    return tables


def _plan(tmp_path, k=None, calibration=None):
    from imgclf.cost import load_calibration
    from imgclf.tables.plan import Plan

    plan = Plan.from_dir(_tables(tmp_path, k), REPO / "config" / "recipes")
    path = tmp_path / "calibration.json"
    if calibration is not None:
        calibration(plan, path)
    plan.use_calibration(load_calibration(path), path)
    return plan


def _run(plan, row):
    return next(r for r in plan.runs.values() if f"a/{row}" in r.rows or f"b/{row}" in r.rows)


def _calibrate(rates):
    """A calibration file of depth-8 resnet_preact at the digits' batch (fp32), k -> img/s."""
    def write(plan, path):
        config = _run(plan, "cheap").config
        entries = [{"dataset": "digits", "model": "resnet_preact", "model_config": config["model"]["resnet_preact"],
                    "batch_size": config["train"]["batch_size"], "precision": "fp32", "k": k, "img_s": rate}
                   for k, rate in rates.items()]
        path.write_text(json.dumps({"format": 1, "device": "Test GPU", "torch": "9.9", "date": "2030-01-01",
                                    "entries": entries}))
    return write


def _done(plan, row, seed, runs):
    folder = runs / _run(plan, row).run_id / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("{}")


# The calibration: k=1 trains 100 epochs of the digits in 1 GPU-hour; k=2 reaches 1.25x the
# aggregate, so each of the 2 packed seeds costs 1 / 1.25 = 0.8 GPU-hours.
RATES = {1: ONE_HOUR_OF_100_EPOCHS, 2: 1.25 * ONE_HOUR_OF_100_EPOCHS}


def test_calibrated_hours_at_k_2_and_at_1_beside_the_reference(tmp_path):
    plan = _plan(tmp_path, k=2, calibration=_calibrate(RATES))
    runs = tmp_path / "runs"
    _done(plan, "dear", 1, runs)  # a finished seed costs nothing more
    lines = plan.summary(runs).splitlines()
    assert lines[0] == "imgclf plan: 2 tables, 4 rows -> 3 distinct runs, 6 run-seeds (1 done, 5 to train)"
    # to train: cheap 0,1 (calibrated: 0.8 each at k=2, 1.0 at k=1; reference 1h), dear 0 (not
    # calibrated: 2.5 everywhere), other 0,1 (50 epochs of the calibrated model: 0.5 each, its own
    # seeds_per_gpu being 1; reference 20 min)
    # packed: 1.6 + 2.5 + 1.0 = 5.1; k=1: 2.0 + 2.5 + 1.0 = 5.5; reference: 2.0 + 2.5 + 0.6667 = 5.2
    assert lines[1] == ("imgclf GPU-hours to go at the runs' seeds_per_gpu / at 1 seed per GPU / at the reference "
                        f"README's times (calibration {tmp_path / 'calibration.json'}: Test GPU, torch 9.9, "
                        "2030-01-01; seeds it does not cover count the reference's times): "
                        "5.1 / 5.5 / 5.2 (5 seed(s), 1 not calibrated)")
    # table a: cheap 0,1 + dear 0 = 1.6 + 2.5 = 4.1 / 2.0 + 2.5 = 4.5 / 2.0 + 2.5 = 4.5
    # table b: cheap 0,1 + other 0,1 = 1.6 + 1.0 = 2.6 / 2.0 + 1.0 = 3.0 / 2.0 + 0.6667 = 2.7
    assert lines[2:] == ["  a: 4.1 / 4.5 / 4.5 (3 seed(s), 1 not calibrated)", "  b: 2.6 / 3.0 / 2.7 (4 seed(s))"]


def test_calibrated_hours_at_k_1(tmp_path):
    plan = _plan(tmp_path, calibration=_calibrate(RATES))
    lines = plan.summary(tmp_path / "runs").splitlines()
    # every run at k=1: cheap 2 x 1.0, dear 2 x 2.5, other 2 x 0.5 = 8.0; reference 2 + 5 + 0.6667
    assert lines[1].endswith(": 8.0 / 8.0 / 7.7 (6 seed(s), 2 not calibrated)")
    assert lines[2:] == ["  a: 7.0 / 7.0 / 7.0 (4 seed(s), 2 not calibrated)", "  b: 3.0 / 3.0 / 2.7 (4 seed(s))"]


def test_a_k_the_calibration_lacks_falls_back_to_the_reference(tmp_path):
    plan = _plan(tmp_path, k=2, calibration=_calibrate({1: RATES[1]}))
    lines = plan.summary(tmp_path / "runs").splitlines()
    # cheap (k=2 unmeasured) 2 x 1.0 reference, dear 2 x 2.5, other 2 x 0.5 calibrated at k=1
    assert lines[1].endswith(": 8.0 / 8.0 / 7.7 (6 seed(s), 4 not calibrated)")


def test_without_a_calibration_file_the_reference_times_are_used_and_said(tmp_path):
    plan = _plan(tmp_path, k=2)
    lines = plan.summary(tmp_path / "runs").splitlines()
    where = tmp_path / "calibration.json"
    assert lines[1] == (f"imgclf GPU-hours to go at the reference README's reported times (no calibration file "
                        f"{where}; `imgclf calibrate` measures a GPU): 7.7 (6 seed(s))")
    assert lines[2:] == ["  a: 7.0 (4 seed(s))", "  b: 2.7 (4 seed(s))"]


def test_only_the_most_expensive_tables_get_a_line(tmp_path, monkeypatch):
    from imgclf.tables.plan import Plan

    monkeypatch.setattr(Plan, "SUMMARY_TABLES", 1)
    lines = _plan(tmp_path).summary(tmp_path / "runs").splitlines()
    assert lines[2:] == ["  a: 7.0 (4 seed(s))", "  1 more table(s) with seeds to train: 2.7"]


@pytest.mark.parametrize("text, said", [
    ("{", r"not a calibration file \(JSON\)"),
    ('{"format": 2, "entries": []}', r"format: expected 1, got 2"),
    ('{"format": 1, "entries": [{"k": 1}]}', r"entries\[0\]: missing key 'dataset'"),
    ('{"format": 1, "entries": [{"dataset": "d", "model": "m", "model_config": {}, "batch_size": 1, '
     '"precision": "fp32", "k": 1, "img_s": NaN}]}', r"entries\[0\]: img_s: expected a positive number, got nan"),
])
def test_a_bad_calibration_file_is_one_line_naming_it(tmp_path, text, said):
    from imgclf.cost import load_calibration
    from imgclf.utils import InputError

    path = tmp_path / "calibration.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {said}") as e:
        load_calibration(path)
    assert "\n" not in str(e.value)


def test_the_cheapest_run_has_the_highest_priority_and_a_calibration_reorders(tmp_path):
    plan = _plan(tmp_path)  # reference: other 20 min < cheap 1 h < dear 2.5 h
    ids = {row: _run(plan, row).run_id for row in ("cheap", "dear", "other")}
    assert [plan.priority(ids[r]) for r in ("other", "cheap", "dear")] == [3, 2, 1]
    # measured 5x faster than 1 GPU-hour per 100 epochs: the order stays
    plan = _plan(tmp_path, calibration=_calibrate({1: 5 * ONE_HOUR_OF_100_EPOCHS}))
    # cheap 0.2 h, other 0.1 h (calibrated), dear 2.5 h (reference)
    assert [plan.priority(ids[r]) for r in ("other", "cheap", "dear")] == [3, 2, 1]
    plan = _plan(tmp_path, calibration=_calibrate({1: ONE_HOUR_OF_100_EPOCHS / 10}))
    # cheap 10 h, other 5 h: both now dearer than dear's 2.5 h
    assert [plan.priority(ids[r]) for r in ("dear", "other", "cheap")] == [3, 2, 1]


# --------------------------------------------------------------------------- imgclf calibrate
def _calibrate_cli(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "imgclf", "calibrate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_calibrate_on_cpu_writes_the_aggregate_rates_atomically(tmp_path):
    out = tmp_path / "cal" / "calibration.json"
    out.parent.mkdir()
    run = _calibrate_cli("--device", "cpu", "--recipes", "config/recipes/digits", "--models",
                         "resnet_preact-8,initial_channels=8@16", "--precisions", "fp32", "--k", "1", "2",
                         "--steps", "5", "--warmup", "2", "--output", str(out), "--jsonl", str(tmp_path / "rows.jsonl"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert [p.name for p in out.parent.iterdir()] == ["calibration.json"]  # no temporary file left
    data = json.loads(out.read_text())
    import torch

    assert data["device"].startswith("CPU (") and data["torch"] == torch.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", data["date"])
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    entries = data["entries"]
    assert [(e["dataset"], e["model"], e["batch_size"], e["precision"], e["k"]) for e in entries] == \
        [("digits", "resnet_preact", 16, "fp32", 1), ("digits", "resnet_preact", 16, "fp32", 2)]
    for e, r in zip(entries, rows):
        # the aggregate is every image over the span first start .. last end: at most the sum of
        # the workers' own rates
        assert e["img_s"] == r["wall_img_per_s"] > 0 and len(r["per_process"]) == e["k"]
        assert e["img_s"] <= sum(r["per_process"]) * 1.001
        assert e["model_config"]["depth"] == 8 and e["model_config"]["initial_channels"] == 8
    # the plan finds these entries for a run of that model
    from imgclf.cost import load_calibration

    config = {"dataset": {"name": "digits"}, "train": {"batch_size": 16, "precision": "fp32"},
              "model": {"name": "resnet_preact", "resnet_preact": entries[0]["model_config"]}}
    assert load_calibration(out).img_s(config, 2) == entries[1]["img_s"]


@pytest.mark.parametrize("args, said", [
    (["--k", "0"], r"--k: 0: expected distinct whole numbers in \[1, 64\]"),
    (["--k", "1", "1"], r"--k: 1 1: expected distinct whole numbers"),
    (["--k", "two"], r"argument --k: invalid int value: 'two'"),
    (["--precisions", "fp64"], r"--precisions: 'fp64' is not one of fp32, tf32, amp, bf16, fp16"),
    (["--models", "nosuch-20"], r"--models: 'nosuch-20': unknown model 'nosuch'"),
    (["--models", "resnet_preact-x"], r"--models: 'resnet_preact-x' is not a model spec"),
    (["--models", "vgg-11"], r"--models: vgg-11: no recipe config/recipes/digits/vgg.yaml"),
    (["--steps", "0"], r"--steps: 0 is out of range \(at least 1\)"),
    (["--models", "resnet_preact-20-4"], r"--models: resnet_preact-20-4: .*widening_factor"),
    (["--precisions", "fp16"], r"--precisions: fp16 needs a CUDA device"),
    (["--max-seconds", "nan"], r"--max-seconds: nan is out of range"),
    (["--device", "tpu"], r"--device: 'tpu' is not a device|--device: 'tpu': only cuda and cpu"),
    (["--output", "/nonexistent/c.json"], r"--output: /nonexistent/c.json: the folder /nonexistent does not exist"),
])
def test_a_bad_calibrate_option_is_one_line(args, said):
    run = _calibrate_cli("--device", "cpu", "--recipes", "config/recipes/digits", "--models", "resnet_preact-8", *args)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and re.search(said, run.stderr), run.stderr


# --------------------------------------------------------------------------- the workflow
def test_a_dry_run_prints_the_hours_and_gives_cheaper_runs_higher_priority(tmp_path):
    import shutil

    root = tmp_path / "project"
    shutil.copytree(REPO / "config" / "recipes", root / "config" / "recipes")
    tables = _tables(root)
    shutil.move(tables, root / "config" / "tables")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["a"], progress=False)
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache")}

    def dry(*args):
        out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                              "--directory", str(root), "--cores", "1", "-n", *args], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout + out.stderr

    text = dry()
    assert ("imgclf GPU-hours to go at the reference README's reported times (no calibration file "
            "config/calibration.json; `imgclf calibrate` measures a GPU): 7.7 (6 seed(s))") in text
    from imgclf.tables.plan import Plan

    plan = Plan.from_dir(root / "config" / "tables", root / "config" / "recipes")
    cheap, dear = _run(plan, "cheap").run_id, _run(plan, "dear").run_id
    # every train job's wildcards and priority, as Snakemake itself reports them
    jobs = re.findall(r"rule train:.*?wildcards: dataset=(\w+), run=([\w-]+), seed=(\d)\n\s+priority: (\d+)",
                      text, re.S)
    priorities = {(f"{d}-{r}", int(s)): int(p) for d, r, s, p in jobs}
    assert priorities == {(cheap, 0): 2, (cheap, 1): 2, (dear, 0): 1, (dear, 1): 1}  # other's 20 min: 3, not in a
    # a table's own jobs come before any training job: a finished table renders at once
    for rule in ("aggregate", "render", "plots"):
        assert re.search(rf"rule {rule}:.*?wildcards: table=a\n\s+priority: 4\n", text, re.S), rule

    # a calibration file (the config key) makes dear the cheapest, its seeds the first
    _calibrate({1: 1000 * ONE_HOUR_OF_100_EPOCHS})(plan, root / "cal.json")
    cal = json.loads((root / "cal.json").read_text())
    for e in cal["entries"]:
        e["model_config"] = _run(plan, "dear").config["model"]["resnet_preact"]
    (root / "cal.json").write_text(json.dumps(cal))
    text = dry("--config", "calibration=cal.json")
    assert "imgclf GPU-hours to go at the runs' seeds_per_gpu / at 1 seed per GPU" in text
    jobs = re.findall(r"rule train:.*?wildcards: dataset=(\w+), run=([\w-]+), seed=(\d)\n\s+priority: (\d+)",
                      text, re.S)
    assert {f"{d}-{r}": int(p) for d, r, s, p in jobs} == {dear: 3, cheap: 1}  # other (table b) 2

    (root / "cal.json").write_text("{")
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
                          "--directory", str(root), "--cores", "1", "-n", "--config", "calibration=cal.json"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert re.search(r"config: calibration: cal\.json: not a calibration file \(JSON\): .*; write it again with "
                     r"`imgclf calibrate`\n", out.stdout + out.stderr), out.stdout[-2000:]


def test_calibrating_again_on_the_same_device_keeps_the_other_entries(tmp_path):
    from imgclf.calibrate import _merge
    from imgclf.cost import write_calibration

    def entry(model, k, rate):
        return {"dataset": "CIFAR10", "model": model, "model_config": {"depth": 20}, "batch_size": 128,
                "precision": "amp", "k": k, "img_s": rate}

    path = tmp_path / "calibration.json"
    write_calibration(path, device="GPU A", torch_version="2.0", date="d", steps=1, warmup=1,
                      entries=[entry("wrn", 1, 10.0), entry("resnet_preact", 1, 20.0)])
    new = [entry("resnet_preact", 1, 25.0), entry("resnet_preact", 2, 40.0)]
    assert _merge(path, "GPU A", "2.0", new) == [entry("wrn", 1, 10.0), *new]
    assert _merge(path, "GPU B", "2.0", new) == new  # another device's numbers are not mixed in
    assert _merge(path, "GPU A", "2.1", new) == new
