"""Hostile run directories and records: 1. an output folder of someone else's files, 2. malformed
or non-finite result.json/eval.json, 3. checkpoints that do not fit the run, 4. two processes at
once (dataset preparation, a seed that is training), 5. a non-UTF-8 locale with non-ASCII paths.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from conftest import DIGITS, RECIPES, REPO, TINY, imgclf_cmd, make_run, planned_jobs
from test_hostile_input import ROW, _finish, _spec, _tree, digits_train, refused, tiny  # noqa: F401

from imgclf import config as C, records, runs, status
from imgclf.cli import main
from imgclf.engine import checkpoint as ckpt, train
from imgclf.launch import jobs
from imgclf.tables import report, spec as S
from imgclf.utils import atomic_write_text, exclusive, os_form, text_form


# =========================================================================== 1. foreign files
def test_a_model_pt_without_our_config_is_refused_and_kept(work, capsys):
    out = work / "mine"
    out.mkdir()
    (out / "model.pt").write_bytes(b"weights I trained elsewhere")
    refused(work, capsys, digits_train(*tiny(), out=out), str(out), "model.pt", "no config.yaml")
    assert (out / "model.pt").read_bytes() == b"weights I trained elsewhere"


def test_the_projects_config_folder_is_refused(work, capsys):
    shutil.copytree(REPO / "config", work / "config", ignore=shutil.ignore_patterns("recipes"))
    (work / "config" / "recipes").mkdir()
    line = refused(work, capsys, digits_train(*tiny(), out=work / "config"), "not a run directory")
    assert "tables" in line and "recipes" in line


def test_a_config_yaml_that_is_no_run_config_is_refused(work, capsys):
    out = work / "settings"
    out.mkdir()
    (out / "config.yaml").write_text("tables: [cifar10]\nlauncher: debug\nseeds: [0, 1]\n")
    refused(work, capsys, digits_train(*tiny(), out=out), "settings/config.yaml", "not a run's resolved config")


def test_other_files_beside_our_config_are_refused(work, capsys):
    out = make_run(work / "run")  # our config.yaml of a run that never reached its first checkpoint...
    (out / "notes.txt").write_text("my notes")  # ... and someone's notes beside it
    refused(work, capsys, digits_train(*tiny(), out=out), "notes.txt", "not a run directory")


def test_a_crowded_folder_is_named_in_a_few_names_and_nothing_is_written(work, capsys):
    out = work / "photos"
    out.mkdir()
    for i in range(30):
        (out / f"img{i:02d}.jpg").write_bytes(b"x")
    line = refused(work, capsys, digits_train(*tiny(), out=out), "img00.jpg", "and 26 more")
    assert "img10.jpg" not in line
    assert not (work / "resources").exists()  # not even the dataset cache


def test_what_stays_accepted(tmp_path):
    cfg = C.build(DIGITS, TINY)
    runs.prepare(cfg, tmp_path / "empty", resume=False)  # a folder that does not exist yet
    (tmp_path / "new").mkdir()
    runs.prepare(cfg, tmp_path / "new", resume=False)  # an empty one
    run = make_run(tmp_path / "ours", **{"train.seed": 3})  # only our config.yaml: replaced
    for name in ("checkpoint.pt", "checkpoint.json", "train_log.csv", "env.json", "job.json", ".lock",
                 ".checkpoint.pt.k2j_x9q1.tmp", "eval.json.corrupt"):
        (run / name).write_bytes(b"x")
    (run / "submitit").mkdir()
    assert runs.foreign_files(run) == []
    (run / "checkpoint.pt").unlink()
    runs.prepare(cfg, run, resume=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 0


# =========================================================================== 2. run records
CORRUPT = {
    "nan": ('{"test_error": NaN, "train_seconds": 3.0}', "NaN"),
    "infinity": ('{"test_error": Infinity}', "Infinity"),
    "missing-key": ('{"test_loss": 0.2, "train_seconds": 3.0}', "missing key 'test_error'"),
    "string": ('{"test_error": "5.0"}', "'test_error' is '5.0', expected a number"),
    "garbage": ("\x00\x01\x02garbage", "binary data"),
    "truncated": ('{"test_error": 5.', "not valid JSON"),
    "seconds-inf": ('{"test_error": 5.0, "train_seconds": -Infinity}', "-Infinity"),
    "diverged-text": ('{"test_error": 5.0, "diverged": "no"}', "'diverged' is 'no'"),
}


@pytest.mark.parametrize("text, expect", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_malformed_record_is_corrupt_on_one_line(tmp_path, text, expect):
    path = tmp_path / "eval.json"
    path.write_text(text)
    with pytest.raises(records.RecordError) as e:
        records.read(path)
    assert str(e.value).startswith(str(path)) and expect in str(e.value) and "\n" not in str(e.value)


def _table(tmp_path):
    table = S.load(_spec(tmp_path, [ROW]), RECIPES)
    rid = table.rows[0].run_id
    _finish(tmp_path / "runs", rid, 0, 4.0)
    return table, rid, tmp_path / "runs" / rid / "seed1"


@pytest.mark.parametrize("key", ["nan", "infinity", "missing-key", "string", "garbage"])
def test_status_counts_a_corrupt_record_as_not_done(tmp_path, key):
    table, rid, seed1 = _table(tmp_path)
    seed1.mkdir(parents=True)
    (seed1 / "eval.json").write_text(CORRUPT[key][0])
    seeds = status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)
    assert [s.status for s in seeds] == ["done", "corrupt"]
    assert str(seed1 / "eval.json") in seeds[1].detail and CORRUPT[key][1] in seeds[1].detail
    assert "1 done, 1 corrupt" in status.render(seeds)


@pytest.mark.parametrize("key", ["nan", "infinity", "missing-key", "string"])
def test_table_refuses_and_partial_table_skips_a_corrupt_record_saying_so(work, capsys, key):
    table, rid, seed1 = _table(work)
    seed1.mkdir(parents=True)
    (seed1 / "eval.json").write_text(CORRUPT[key][0])
    argv = ["table", work / "t.yaml", "--runs", work / "runs", "--recipes", RECIPES, "--out", work / "out"]
    line = refused(work, capsys, argv, "1 seed(s)", "seed1/eval.json")
    assert main([str(a) for a in argv] + ["--partial"]) == 0
    out, err = capsys.readouterr()
    assert "| 4.00 (1/2 done) " in out and "inf" not in out.lower() and "nan" not in out.lower()
    warned = [ln for ln in err.splitlines() if str(seed1 / "eval.json") in ln]
    assert len(warned) == 1 and CORRUPT[key][1] in warned[0]


def test_a_seed_holding_another_configs_result_is_not_this_rows(tmp_path):
    table, rid, seed1 = _table(tmp_path)
    _finish(tmp_path / "runs", rid, 1, 9.0)
    (seed1 / "result.json").write_text(json.dumps({"test_error": 9.0, "config_hash": "deadbeef", "seed": 1}))
    rec = report.frame_records(report.aggregate(table, tmp_path / "runs", partial=True))[0]
    assert rec["n_done"] == 1 and rec["test_error_median"] == 4.0
    with pytest.raises(FileNotFoundError, match="another config"):
        report.aggregate(table, tmp_path / "runs")
    seeds = status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)
    assert seeds[1].status == "corrupt" and "deadbeef" in seeds[1].detail and "move the seed folder" in seeds[1].detail
    assert records.set_aside(seed1) == [] and (seed1 / "result.json").is_file()  # someone's result: kept
    # Its own hash is this row's: shown.
    (seed1 / "result.json").write_text(json.dumps({"test_error": 9.0, "config_hash": rid.rsplit("-", 1)[1]}))
    rec = report.frame_records(report.aggregate(table, tmp_path / "runs"))[0]
    assert rec["n_done"] == 2 and rec["test_error_median"] == 6.5


def test_diverged_records_stay_valid(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"diverged": True, "test_error": None, "train_seconds": None,
                                                      "message": "loss is nan at epoch 2"}))
    assert records.read(tmp_path / "result.json")["diverged"] is True


SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile")]


def test_the_workflow_sets_a_corrupt_record_aside_and_trains_the_seed_again(tmp_path):
    shutil.copytree(RECIPES, tmp_path / "config" / "recipes")
    (tmp_path / "config" / "tables").mkdir()
    row = {**ROW, "overrides": {**TINY, "scheduler.epochs": 1}}
    (tmp_path / "config" / "tables" / "tiny.yaml").write_text(
        yaml.safe_dump({"title": "Tiny", "seeds": [0], "rows": [row]}, sort_keys=False))
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(tables=["tiny"], progress=False)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(tmp_path / "resources" / "cache")}

    def snakemake(*args):
        out = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--cores", "1", *args], cwd=tmp_path,
                             env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    snakemake()
    seed = next((tmp_path / "results" / "runs").iterdir()) / "seed0"
    score = json.loads((seed / "eval.json").read_text())
    for name, text in (("eval.json", '{"test_error": NaN}'), ("result.json", '{"test_error": "oops"}')):
        (seed / name).write_text(text)
        dry = snakemake("-n")
        assert planned_jobs(dry) == {"train": 1, "aggregate": 1, "render": 1, "plots": 1, "all": 1}
        assert f"{seed.relative_to(tmp_path) / name}: " in dry.stderr and "set aside" in dry.stderr
        assert (seed / f"{name}.corrupt").read_text() == text
        snakemake()
        assert json.loads((seed / "eval.json").read_text())["test_error"] == score["test_error"]
        assert records.read(seed / "result.json")["test_error"] == score["test_error"]
        assert planned_jobs(snakemake("-n")) == {}


# =========================================================================== 3. checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (2 epochs, a checkpoint each), trained once for the module."""
    run = make_run(tmp_path_factory.mktemp("ckpt") / "run", **{"scheduler.epochs": 2})
    train(run, progress=False)
    return run


def _tamper(trained, tmp_path, edit) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state = torch.load(run / ckpt.LATEST, weights_only=True)
    edit(state)
    ckpt.save(run, state)  # a verified checkpoint: its sidecar matches, its content does not fit
    return run


def _conv(state) -> str:
    return next(k for k, v in state["model"].items() if v.dim() == 4)


CHECKPOINTS = {
    "no-scaler": (lambda s: s.pop("scaler"), "no 'scaler' state"),
    "no-optimizer": (lambda s: s.pop("optimizer"), "no 'optimizer' state"),
    "tensor-missing": (lambda s: s["model"].pop(_conv(s)), "model tensor(s) missing: "),
    "tensor-extra": (lambda s: s["model"].update(extra=torch.zeros(3)), "model tensor(s) unexpected: extra"),
    "mis-shaped": (lambda s: s["model"].update({_conv(s): torch.zeros(1, 2, 3, 3)}), "is (1, 2, 3, 3), expected"),
    "model-list": (lambda s: s.update(model=[1, 2]), "'model' is a list, expected a dict"),
    "momentum": (lambda s: next(iter(s["optimizer"]["state"].values())).update(momentum_buffer=torch.zeros(7)),
                 "optimizer buffer momentum_buffer of parameter 0 is (7,)"),
}


@pytest.mark.parametrize("edit, expect", CHECKPOINTS.values(), ids=CHECKPOINTS.keys())
def test_a_checkpoint_that_does_not_fit_names_file_what_and_the_way_out(trained, tmp_path, edit, expect):
    run = _tamper(trained, tmp_path, edit)
    with pytest.raises(ckpt.CheckpointError) as e:
        train(run, progress=False)
    message = str(e.value)
    assert message.startswith(str(run / ckpt.LATEST)) and expect in message and "\n" not in message
    assert "without --resume" in message and "remove checkpoint.pt" in message


def test_resume_of_a_checkpoint_without_scaler_is_one_line_from_the_cli(trained, work, capsys):
    run = _tamper(trained, work, lambda s: s.pop("scaler"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    argv = ["train", "--config", str(DIGITS), "--output-dir", str(run), "--quiet", "--resume",
            *(str(x) for kv in {**TINY, "scheduler.epochs": 2}.items() for x in kv)]
    assert cfg["scheduler"]["epochs"] == 2
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "checkpoint.pt: does not fit this run (no 'scaler' state)" in err[0], err
    assert "KeyError" not in err[0]


def test_a_fitting_checkpoint_still_resumes(trained, tmp_path):
    run = _tamper(trained, tmp_path, lambda s: None)
    assert train(run, progress=False)["test_error"] == json.loads((trained / "result.json").read_text())["test_error"]


# =========================================================================== 4. concurrency
def _holds_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def _data_cmd(root: Path, source: Path) -> list[str]:
    return imgclf_cmd("data", "mnist", "--root", str(root), "--from", str(source))


def _lock_path(cache: Path) -> Path:
    return cache / ".mnist.prepare.lock"


def test_a_second_preparation_waits_for_the_first(tmp_path, data_root):
    cache = tmp_path / "cache"
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(cache)}
    with exclusive(_lock_path(cache)):  # the test is the first preparation
        proc = subprocess.Popen(_data_cmd(tmp_path / "root", data_root / "mnist"), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            while not _holds_open(proc.pid, _lock_path(cache)):  # it reached the lock ...
                assert proc.poll() is None, proc.communicate()
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)  # ... and waits there
            assert not (tmp_path / "root").exists()  # nothing copied while it waits
        except BaseException:
            proc.kill()
            raise
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "60000 train + 10000 test images" in out
    assert not _lock_path(cache).exists()  # and no lock file is left behind


def test_two_preparations_at_once_both_succeed(tmp_path, data_root):
    for attempt in range(2):
        root, cache = tmp_path / f"root{attempt}", tmp_path / f"cache{attempt}"
        env = {**os.environ, "IMGCLF_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen(_data_cmd(root, data_root / "mnist"), env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0 and "60000 train" in out, err
        assert sorted(os.listdir(cache)) == ["mnist.pt"]


def test_the_lock_is_exclusive_and_leaves_nothing(tmp_path):
    lock = tmp_path / "a" / "b" / ".x.lock"
    order, entered = [], threading.Event()

    def second():
        with exclusive(lock):
            order.append("second")
            entered.set()

    with exclusive(lock):
        assert lock.is_file()
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)  # blocked while the first holds it
        order.append("first")
    t.join(60)
    assert order == ["first", "second"] and not lock.exists()  # no lock file left behind
    with exclusive(tmp_path / "c" / "d" / ".y.lock"):
        pass
    assert not (tmp_path / "c").exists()  # nor the folders made for it


def _stopped_seed(tmp_path):
    table = S.load(_spec(tmp_path, [ROW]), RECIPES)
    seed0 = tmp_path / "runs" / table.rows[0].run_id / "seed0"
    make_run(seed0)
    (seed0 / "checkpoint.pt").write_bytes(b"x")
    (seed0 / "train_log.csv").write_text("epoch\n1\n")
    return seed0


def test_status_says_running_while_a_process_holds_the_seeds_lock(tmp_path):
    seed0 = _stopped_seed(tmp_path)
    assert status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)[0].status == "stopped"
    with jobs.RunLock(seed0):
        now = status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)[0]
        assert now.status == "running" and f"pid {os.getpid()}" in now.detail and "epoch 1/" in now.detail
    assert status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)[0].status == "stopped"


def test_status_sees_another_processes_lock_and_never_takes_it(tmp_path):
    seed0 = _stopped_seed(tmp_path)
    code = ("import sys; from imgclf.launch import jobs\n"
            "with jobs.RunLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(seed0)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        now = status.table_status(tmp_path / "t.yaml", tmp_path / "runs", RECIPES)[0]
        assert now.status == "running" and f"pid {holder.pid}" in now.detail
    finally:
        holder.stdin.close()
        holder.wait(60)
    assert jobs.lock_holder(seed0) is None
    with jobs.RunLock(seed0):  # looking took nothing: the lock is free for the next owner
        pass
    assert not (tmp_path / "nolock").exists() and jobs.lock_holder(tmp_path / "nolock") is None


# =========================================================================== 5. encoding
def _c_locale_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")}
    env.update(LC_ALL="C", PYTHONUTF8="0", IMGCLF_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src"))
    return env


def _c_run(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(imgclf_cmd(*args), env=_c_locale_env(tmp_path), cwd=tmp_path, capture_output=True,
                          timeout=900)


def test_a_non_ascii_run_directory_under_the_c_locale_trains_resumes_and_evaluates(tmp_path):
    out = tmp_path / "résultats" / "seed0"
    overrides = [str(x) for kv in {**TINY, "scheduler.epochs": 1}.items() for x in kv]
    train_argv = ["train", "--config", str(DIGITS), "--output-dir", str(out), "--quiet"]
    first = _c_run(tmp_path, *train_argv, *overrides)
    assert first.returncode == 0, first.stderr.decode(errors="replace")
    saved = (out / "config.yaml").read_bytes().decode("utf-8")  # UTF-8 text, readable anywhere
    assert yaml.safe_load(saved)["train"]["output_dir"] == str(out)
    again = _c_run(tmp_path, *train_argv, "--resume", *overrides)  # reads its config.yaml back and compares
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    scored = _c_run(tmp_path, "evaluate", "--run", str(out))
    assert scored.returncode == 0, scored.stderr.decode(errors="replace")
    assert runs.load_run_config(out).train.output_dir == str(out)  # and in a UTF-8 process too


def test_a_non_ascii_data_root_under_the_c_locale_is_kept_and_read_back(tmp_path):
    root = tmp_path / "données"
    argv = ["train", "--config", str(DIGITS), "--quiet",
            *(str(x) for kv in {**TINY, "scheduler.epochs": 1, "data_root": str(root)}.items() for x in kv)]
    done = _c_run(tmp_path, *argv)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (run,) = (tmp_path / "results" / "runs").glob("*/seed0")
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data_root"] == str(root)
    assert runs.load_run_config(run).data_root == str(root)
    scored = _c_run(tmp_path, "evaluate", "--run", str(run.relative_to(tmp_path)))
    assert scored.returncode == 0, scored.stderr.decode(errors="replace")


def test_table_and_status_print_under_the_c_locale(tmp_path):
    spec = _spec(tmp_path, [{**ROW, "label": "Réseau résiduel"}])
    table = S.load(spec, RECIPES)
    _finish(tmp_path / "runs", table.rows[0].run_id, 0, 4.0)
    _finish(tmp_path / "runs", table.rows[0].run_id, 1, 6.0)
    shown = _c_run(tmp_path, "table", str(spec), "--runs", "runs", "--recipes", str(RECIPES), "--out", "out")
    assert shown.returncode == 0, shown.stderr.decode(errors="replace")
    text = shown.stdout.decode("utf-8")
    assert "Réseau résiduel" in text and "Δ vs reference" in text and "| 5.00 " in text
    assert "Réseau résiduel" in (tmp_path / "out" / "t.md").read_text(encoding="utf-8")
    st = _c_run(tmp_path, "status", str(spec), "--runs", "runs", "--recipes", str(RECIPES))
    assert st.returncode == 0 and "2 seeds: 2 done" in st.stdout.decode("utf-8"), st.stderr


def test_paths_held_as_surrogate_escapes_round_trip_through_text_files(tmp_path, monkeypatch):
    held = "/data/r\udcc3\udca9sultats"  # how Python under LC_ALL=C holds '/data/résultats' from argv
    assert text_form(held) == "/data/résultats" and text_form({"a": [held]}) == {"a": ["/data/résultats"]}
    atomic_write_text(tmp_path / "f.txt", held)
    assert (tmp_path / "f.txt").read_bytes() == "/data/résultats".encode("utf-8")
    monkeypatch.setattr(os, "fsdecode", lambda b: b.decode("ascii", "surrogateescape"))  # that locale's decoding
    assert os_form("/data/résultats") == held and os_form(text_form(held)) == held


# Calls that open a text file: each must say encoding= (or open in binary mode).
_TEXT_CALLS = {"open", "read_text", "write_text", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"}


def _binary_mode(call: ast.Call) -> bool:
    modes = [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    modes += [k.value for k in call.keywords if k.arg == "mode"]
    texts = [m.value for m in modes if isinstance(m, ast.Constant) and isinstance(m.value, str)]
    if not texts:
        # tempfile's classes default to binary 'w+b'; open/read_text/write_text to text
        return isinstance(call.func, (ast.Attribute, ast.Name)) and \
            getattr(call.func, "attr", getattr(call.func, "id", "")) in ("NamedTemporaryFile", "TemporaryFile",
                                                                        "SpooledTemporaryFile")
    return any("b" in t for t in texts)


def test_every_text_file_is_opened_as_utf8():
    files = [*(REPO / "src").rglob("*.py"), *(REPO / "workflow" / "scripts").glob("*.py")]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if name not in _TEXT_CALLS or owner in ("os", "tarfile", "gzip", "lzma", "bz2", "Image"):
                continue
            if name in ("read_text", "write_text") and not isinstance(func, ast.Attribute):
                continue  # imgclf.utils.read_text: bytes decoded as UTF-8
            if _binary_mode(node) or any(k.arg == "encoding" for k in node.keywords):
                continue
            bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []
