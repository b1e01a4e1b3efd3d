"""The prepared GPU run (benchmarks/gpu_session.sh) in its CPU smoke mode: every part writes its
output into $OUT, and one part's failure keeps the others."""
import json
import os
import subprocess

from conftest import REPO


def session(out, **env):
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh")], cwd=REPO, capture_output=True,
                         text=True, timeout=400, env={**os.environ, "SMOKE": "1", "OUT": str(out), **env})
    parts = dict(line.split(": ", 1) for line in (out / "parts.log").read_text().splitlines())
    return run, parts


def test_smoke_session_measures_first_then_trains_into_out(tmp_path):
    run, parts = session(tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [k for k in parts] == ["env", "steps", "train", "total"]
    assert all(parts[k].startswith("ok") for k in ("env", "steps", "train")), parts
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(r["model"], r["precision"], r["speed_path"]) for r in rows] == [
        ("resnet_preact20", "fp32", False), ("resnet_preact20", "tf32", False)]
    assert all(r["img_per_s"] > 0 for r in rows)
    assert "| resnet_preact20 | tf32 | off |" in (tmp_path / "steps.md").read_text()
    row = tmp_path / "rp20_200ep"
    assert (row / "train_log.csv").read_text().count("\n") == 2  # header + the epoch
    result = json.loads((row / "result.json").read_text())
    assert result["epochs"] == 1 and 0 <= result["test_error"] <= 100
    assert json.loads((row / "env.json").read_text())["tf32"] is False
    assert not list(row.glob("checkpoint*.pt"))  # weights are not carried back


def test_a_failing_part_keeps_the_others(tmp_path):
    run, parts = session(tmp_path, STEPS_EXTRA="--precisions fp64")
    assert parts["steps"].startswith("failed (rc 2)")
    assert parts["train"].startswith("ok") and (tmp_path / "rp20_200ep" / "result.json").is_file()
