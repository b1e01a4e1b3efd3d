"""The engine: determinism, bit-exact resume after SIGKILL or a stop request, run-dir contents."""
import csv
import os
import subprocess
import threading

import pytest
import torch

from conftest import REPO, imgclf_cmd, make_run, stop_during_step
from imgclf.engine import Preempted, Trainer, train


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def log_rows(run_dir):
    with open(run_dir / "train_log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run (3 epochs, checkpoint every epoch)."""
    run = make_run(tmp_path_factory.mktemp("ref") / "run")
    result = train(run, progress=False)
    return run, result


def test_run_directory_explains_itself(reference):
    run, result = reference
    for name in ("config.yaml", "env.json", "train_log.csv", "checkpoint.pt", "checkpoint.json", "model.pt",
                 "result.json"):
        assert (run / name).is_file(), name
    rows = log_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
                            "epoch_seconds", "images_per_second"}
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert result["test_error"] == pytest.approx(float(rows[-1]["test_error"]))
    assert result["n_params"] == sum(v.numel() for k, v in weights(run).items()
                                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_same_config_same_weights(reference, tmp_path):
    run, _ = reference
    again = make_run(tmp_path / "again")
    train(again, progress=False)
    assert_same_weights(run, again)


def test_different_seed_different_weights(reference, tmp_path):
    other = make_run(tmp_path / "other", **{"train.seed": 1})
    train(other, progress=False)
    assert not torch.equal(weights(reference[0])["fc.weight"], weights(other)["fc.weight"])


@pytest.mark.parametrize("fault", ["step:30", "eval:2", "checkpoint:2"])
def test_sigkill_then_resume_is_bit_identical(reference, tmp_path, fault):
    """Killed inside a step (epoch 2: 10 steps per epoch), inside evaluation or while writing a
    checkpoint; `imgclf train --resume` finishes with the uninterrupted run's weights and log."""
    run = make_run(tmp_path / "run")
    cmd = imgclf_cmd("train", "--config", str(run / "config.yaml"), "--output-dir", str(run), "--resume",
                     "--quiet")
    env = {**os.environ, "IMGCLF_FAULT": fault}
    killed = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (run / "result.json").exists()
    env.pop("IMGCLF_FAULT")
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(reference[0], run)
    ref_rows, rows = log_rows(reference[0]), log_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]  # complete and not duplicated
    assert [r["test_error"] for r in rows] == [r["test_error"] for r in ref_rows]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]


def test_stop_request_mid_epoch_checkpoints_and_resumes_exactly(reference, tmp_path):
    """The preemption path: a stop request at a step boundary writes a mid-epoch checkpoint."""
    run = make_run(tmp_path / "run")
    stop = threading.Event()
    trainer = Trainer(run, progress=False, stop_event=stop)
    stop_during_step(trainer, 14, stop)  # epoch 2, step 4
    with pytest.raises(Preempted, match="epoch 2 step 4"):
        trainer.fit()
    assert trainer.saved_event.is_set()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 4)
    train(run, progress=False)
    assert_same_weights(reference[0], run)
    assert [r["train_loss"] for r in log_rows(run)] == [r["train_loss"] for r in log_rows(reference[0])]


def test_checkpoint_of_another_config_is_refused(reference, tmp_path):
    from imgclf import config as C, runs

    with pytest.raises(C.ConfigError, match="different config"):
        runs.prepare(C.build(REPO / "config/recipes/digits/resnet_preact.yaml"), reference[0], resume=True)


# What a GPU machine without a package index has: torch, torchvision, numpy, pyyaml (and scikit-learn
# here, the digits' source). The workflow's and the tables' packages must stay lazy imports.
_BLOCK_WORKFLOW_PACKAGES = """
import sys
BLOCKED = {"snakemake", "submitit", "pandas", "tabulate", "matplotlib", "tqdm"}
class Hide:  # every finder finds nothing for BLOCKED, as when they are not installed
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
from imgclf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_imgclf_train_needs_only_torch_torchvision_numpy_and_pyyaml(tmp_path):
    from conftest import DIGITS, TINY

    overrides = [str(x) for k, v in {**TINY, "scheduler.epochs": 1}.items() for x in (k, v)]
    out = subprocess.run([*imgclf_cmd()[:1], "-c", _BLOCK_WORKFLOW_PACKAGES, "train", "--config", str(DIGITS),
                          "--output-dir", str(tmp_path / "run"), "--quiet", *overrides],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "result.json").is_file()


# Bit-exact resume with every source of randomness the tables use: the batch mixers draw from
# the step's generator, Cutout too, dropout and shake-shake from the global generator (reseeded
# per step), and 2 torch threads (oneDNN's parallel reductions) instead of 1.
_RESUME_CASES = {
    "mixup": {"augmentation.use_mixup": True},
    "cutout": {"augmentation.use_cutout": True, "augmentation.cutout.mask_size": 4},
    "ricap": {"augmentation.use_ricap": True, "augmentation.use_random_crop": False},
    "dropout": {"model.name": "wrn", "model.wrn.depth": 10, "model.wrn.widening_factor": 1,
                "model.wrn.initial_channels": 8, "model.wrn.drop_rate": 0.3},
    "shake_shake": {"model.name": "shake_shake", "model.shake_shake.depth": 8,
                    "model.shake_shake.initial_channels": 8},
    "2_threads": {"augmentation.use_mixup": True, "augmentation.use_cutout": True,
                  "augmentation.cutout.mask_size": 4},
}


@pytest.mark.parametrize("case", list(_RESUME_CASES), ids=list(_RESUME_CASES))
def test_stop_mid_epoch_and_resume_is_bit_identical_with_random_features(case, tmp_path):
    """Stopped at epoch 2 step 4 of 2 epochs (10 steps each), resumed in a fresh Trainer: the
    final weights and the logged losses equal an uninterrupted run's, bit for bit."""
    overrides = {"scheduler.epochs": 2, **_RESUME_CASES[case]}
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if case == "2_threads" else 1)
    try:
        whole = make_run(tmp_path / "whole", **overrides)
        train(whole, progress=False)
        run = make_run(tmp_path / "run", **overrides)
        stop = threading.Event()
        trainer = Trainer(run, progress=False, stop_event=stop)
        stop_during_step(trainer, 14, stop)  # epoch 2, step 4
        with pytest.raises(Preempted, match="epoch 2 step 4"):
            trainer.fit()
        del trainer
        train(run, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(whole, run)
    assert [r["train_loss"] for r in log_rows(run)] == [r["train_loss"] for r in log_rows(whole)]
    assert [r["test_error"] for r in log_rows(run)] == [r["test_error"] for r in log_rows(whole)]
