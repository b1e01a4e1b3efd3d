"""Fault injection: SIGKILLs at random moments, corrupted checkpoints, divergence, locks.

Prints the figures: kills survived / tried, corrupt checkpoints recovered / tried."""
import csv
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import REPO, imgclf_cmd, make_run
from imgclf.engine import checkpoint as ckpt, train

EPOCHS = 4  # 10 steps per epoch at batch 128 on the digits


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("ref") / "run", **{"scheduler.epochs": EPOCHS})
    train(run, progress=False)
    return run


def same_weights(a, b) -> bool:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def log_column(run, column):
    with open(run / "train_log.csv") as f:
        return [row[column] for row in csv.DictReader(f)]


def test_random_sigkills_resume_bit_identically(reference, tmp_path):
    """At least 10 SIGKILLs, each during a step, an evaluation or a checkpoint write, at a
    position drawn from a seeded RNG; every resume continues from the last good checkpoint."""
    rng = random.Random(1234)
    phases = {"step": EPOCHS * 10, "eval": EPOCHS, "checkpoint": EPOCHS + 1}
    tried = survived = 0
    runs = 0
    while tried < 10:
        runs += 1
        kills = 0
        run = make_run(tmp_path / f"run{runs}", **{"scheduler.epochs": EPOCHS})
        cmd = imgclf_cmd("train", "--config", str(run / "config.yaml"), "--output-dir", str(run), "--resume",
                         "--quiet")
        for _ in range(30):  # kill, resume, kill again ... until the run completes
            phase = rng.choice(sorted(phases))
            env = {**os.environ, "IMGCLF_FAULT": f"{phase}:{rng.randint(1, phases[phase])}"}
            out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if out.returncode == 0:
                break
            assert out.returncode == -9, out.stderr[-2000:]
            tried += 1
            kills += 1
            assert not (run / "result.json").exists()
        assert (run / "result.json").exists()
        ok = same_weights(reference, run) and log_column(run, "train_loss") == log_column(reference, "train_loss")
        assert log_column(run, "epoch") == [str(e) for e in range(1, EPOCHS + 1)]
        survived += kills if ok else 0
        assert ok, f"run {runs} differs from the uninterrupted run"
    print(f"\nkills survived / tried: {survived}/{tried} over {runs} runs")


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_sidecar", "both_corrupt"])
def test_corrupt_checkpoint_falls_back(reference, tmp_path, damage, caplog):
    run = make_run(tmp_path / "run", **{"scheduler.epochs": EPOCHS})
    env = {**os.environ, "IMGCLF_FAULT": "step:25"}  # killed in epoch 3: checkpoints of epochs 1 and 2 exist
    cmd = imgclf_cmd("train", "--config", str(run / "config.yaml"), "--output-dir", str(run), "--resume", "--quiet")
    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode == -9
    latest, prev = run / ckpt.LATEST, run / ckpt.PREVIOUS
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        latest.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    elif damage == "delete_sidecar":
        (run / "checkpoint.json").unlink()
    else:
        latest.write_bytes(b"junk")
        prev.write_bytes(b"junk")
    state = ckpt.load_latest(run)
    if damage == "both_corrupt":
        assert state is None  # nothing trustworthy: start over, still the same result
    else:
        assert state is not None and state["epoch"] == 1  # the previous checkpoint (after epoch 1)
        assert "failed verification" in caplog.text or "does not match" in caplog.text
    train(run, progress=False)
    assert same_weights(reference, run)
    assert log_column(run, "epoch") == [str(e) for e in range(1, EPOCHS + 1)]
    print(f"\ncorrupt checkpoints recovered / tried: 1/1 ({damage})")


def test_checkpoints_never_unpickle_code(tmp_path):
    """weights_only=True: a checkpoint carrying a pickled callable is refused, not executed."""
    run = tmp_path / "run"
    run.mkdir()
    evil = run / "payload"
    torch.save({"epoch": 1, "x": os.system}, run / ckpt.LATEST)
    import hashlib, json

    data = (run / ckpt.LATEST).read_bytes()
    (run / "checkpoint.json").write_text(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    assert ckpt.load_latest(run) is None and not evil.exists()


def test_divergence_stops_with_step_and_run_named(tmp_path):
    run = make_run(tmp_path / "run", **{"train.base_lr": 1e6, "train.log_period": 1})
    result = train(run, progress=False)
    assert result["diverged"] and result["test_error"] is None
    assert "training loss became" in result["message"] and "epoch 1" in result["message"]
    assert str(run) in result["message"]
    assert (run / "diverged.json").is_file() and not (run / "model.pt").exists()
    out = subprocess.run(imgclf_cmd("evaluate", "--run", str(run)), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "diverged" in out.stdout


def test_divergence_rollback_lowers_the_lr_and_recovers(tmp_path):
    run = make_run(tmp_path / "run", **{"train.base_lr": 1e6, "train.log_period": 1,
                                         "train.on_divergence": "rollback", "train.rollback_lr_factor": 1e-7,
                                         "train.max_rollbacks": 2})
    result = train(run, progress=False)
    assert not result.get("diverged") and result["test_error"] < 50
    state = torch.load(run / ckpt.LATEST, weights_only=True)
    assert state["rollbacks"] == 1


def test_concurrent_snakemake_is_refused_by_the_lock(tmp_path):
    import shutil

    import yaml

    root = tmp_path / "project"
    shutil.copytree(REPO / "config", root / "config")
    cfg = yaml.safe_load((root / "config" / "config.yaml").read_text())
    cfg["progress"] = False
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory",
            str(root), "--cores", "1"]
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(root / "resources" / "cache")}
    first = subprocess.Popen([*base, "resources/cache/digits.pt"], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        locks = root / ".snakemake" / "locks"
        import time

        deadline = time.monotonic() + 60
        while not (locks.is_dir() and any(locks.iterdir())):
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run([*base, "results/tables/quickstart.md"], cwd=root, env=env, capture_output=True,
                                text=True)
        assert second.returncode != 0
        assert "lock" in (second.stdout + second.stderr).lower()
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0
    assert not (root / "results").exists()  # the refused run wrote nothing
