"""env.json's record of the process (imgclf.runtime), and the engine's independence from the
launchers: it is handed the record's maker and reads no job variables itself."""
import json
import subprocess

import pytest
import torch

from conftest import REPO, make_run
from imgclf.runtime import environment
from imgclf.utils import InputError

KEYS = ["device", "device_name", "host", "imgclf", "launcher", "python", "slurm_job_id", "threads", "torch",
        "torchvision", "world_size"]


def test_without_the_pack_and_mps_variables_the_record_is_the_one_env_json_always_held():
    plain = environment(torch.device("cpu"), 2, {})
    assert sorted(plain) == KEYS and plain["world_size"] == 2
    assert plain["slurm_job_id"] is None and plain["launcher"] == "debug"
    in_a_job = environment(torch.device("cpu"), 1, {"SLURM_JOB_ID": "77"})  # read from what it is given
    assert sorted(in_a_job) == KEYS and in_a_job["slurm_job_id"] == "77" and in_a_job["launcher"] == "slurm"


@pytest.mark.parametrize("mps, recorded", [("1", True), ("0", False), ("", False)])
def test_the_pack_size_and_mps_are_recorded_when_set(mps, recorded):
    record = environment(torch.device("cpu"), 1, {"IMGCLF_PACK_SIZE": "4", "IMGCLF_MPS": mps})
    assert record["pack"] == {"size": 4} and record["mps"] is recorded
    assert sorted(set(record) - {"pack", "mps"}) == KEYS


def test_a_pack_size_that_is_no_integer_is_one_line_naming_the_variable():
    with pytest.raises(InputError, match=r"^environment: IMGCLF_PACK_SIZE='four' is not an integer$"):
        environment(torch.device("cpu"), 1, {"IMGCLF_PACK_SIZE": "four"})


def test_the_trainer_writes_the_record_it_is_handed(tmp_path):
    from imgclf.engine import train

    run = make_run(tmp_path / "run", **{"scheduler.epochs": 1, "device": "cpu"})
    train(run, progress=False, environment=lambda device, world_size: {"handed": str(device), "world": world_size})
    env = json.loads((run / "env.json").read_text())
    assert env == {"handed": "cpu", "world": 1, "precision": "fp32", "tf32": False, "cudnn_benchmark": False,
                   "deterministic": False}


def test_the_engine_reads_no_launcher_variables_and_imports_no_launcher_code():
    """Only the rendezvous (distenv) reads job variables; the rest of the engine is handed them."""
    out = subprocess.run(["grep", "-rln", r"SLURM\|SUBMITIT\|launch", "src/imgclf/engine"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.stdout.split() == ["src/imgclf/engine/distenv.py"]
