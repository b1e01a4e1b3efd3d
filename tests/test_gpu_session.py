"""The prepared GPU run (benchmarks/gpu_session.sh) in its CPU smoke mode: every part writes its
output into $OUT, every rate is the steady state's (a first step made slow, as a compile would,
is not in it), and one part's failure keeps the others."""
import json
import os
import subprocess

from conftest import REPO

# The first step of every measurement made this much slower, as a long compile or cuDNN's
# algorithm search would: a rate that included it would be at most batch 16 / 3 s = 5.3 img/s.
FIRST_STEP_DELAY = 3.0
SLOW_FIRST_STEP_RATE = 16 / FIRST_STEP_DELAY


def session(out, **env):
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "SMOKE": "1", "OUT": str(out), **env})
    parts = dict(line.split(": ", 1) for line in (out / "parts.log").read_text().splitlines())
    return run, parts


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_session_measures_steady_state_runs_ddp_and_calibration_then_trains_into_out(tmp_path):
    run, parts = session(tmp_path, IMGCLF_BENCH_FIRST_STEP_DELAY=str(FIRST_STEP_DELAY))
    assert run.returncode == 0, run.stderr[-2000:]
    assert list(parts) == ["env", "steps", "ddp_gloo", "calibrate", "train", "total"]
    assert all(parts[k].startswith("ok") for k in list(parts)[:-1]), parts
    env = (tmp_path / "env.log").read_text()
    assert "gcc: " in env and "python headers: " in env

    rows = jsonl(tmp_path / "steps.jsonl")
    assert [(r["model"], r["config"]) for r in rows] == [("resnet_preact20", "fp32"), ("resnet_preact20", "tf32")]
    for r in rows:  # the slow first step is warm-up, timed on its own, never the rate
        assert r["first_step_s"] >= FIRST_STEP_DELAY and r["warmup_s"] >= r["first_step_s"]
        assert r["img_per_s"] > 4 * SLOW_FIRST_STEP_RATE, r
        assert not any("1 step only" in n for n in r["notes"])
    assert "| resnet_preact20 | tf32 |" in (tmp_path / "steps.md").read_text()

    (ddp,) = jsonl(tmp_path / "ddp.log")
    assert ddp["backend"] == "gloo" and ddp["works"] and ddp["images_per_second"] > 0
    assert json.loads((tmp_path / "ddp_gloo" / "result.json").read_text())["world_size"] == 2

    calibration = jsonl(tmp_path / "calibration.jsonl")
    assert [(r["k"], len(r["per_process"])) for r in calibration] == [(1, 1), (2, 2)]
    assert all(min(r["per_process"]) > 4 * SLOW_FIRST_STEP_RATE for r in calibration), calibration
    assert all(0 < r["wall_img_per_s"] <= r["img_per_s"] * 1.01 for r in calibration)
    assert "| resnet_preact-8,initial_channels=8@16 | fp32 | 16 | 2 |" in (tmp_path / "calibration.md").read_text()
    written = json.loads((tmp_path / "calibration.json").read_text())  # the file the plan reads
    assert [(e["k"], e["img_s"]) for e in written["entries"]] == [(r["k"], r["wall_img_per_s"]) for r in calibration]

    row = tmp_path / "rp20_200ep"
    assert (row / "train_log.csv").read_text().count("\n") == 2  # header + the epoch
    result = json.loads((row / "result.json").read_text())
    assert result["epochs"] == 1 and 0 <= result["test_error"] <= 100
    assert json.loads((row / "env.json").read_text())["tf32"] is False
    assert not list(row.glob("checkpoint*.pt")) and not list(tmp_path.glob("ddp_*/checkpoint*.pt"))


def test_a_failing_part_keeps_the_others(tmp_path):
    run, parts = session(tmp_path, STEPS_EXTRA="--configs fp64", PARTS="steps train")
    assert list(parts) == ["env", "steps", "train", "total"]
    assert parts["steps"].startswith("failed (rc 2)")
    assert parts["train"].startswith("ok") and (tmp_path / "rp20_200ep" / "result.json").is_file()
