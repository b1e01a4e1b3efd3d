"""Checkpoints written in the background (engine.checkpoint.BackgroundWriter): the training goes
on while a CPU copy is serialised, hashed and fsynced; the files, the resume and the failures are
those of the synchronous write."""
import threading

import pytest
import torch

from conftest import make_run, stop_during_step
from imgclf.engine import Preempted, Trainer, checkpoint as ckpt, train


def _states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def always_background(monkeypatch):
    """Every checkpoint through the writer thread (the tiny test models are below its threshold),
    recording the thread each write ran on."""
    monkeypatch.setattr(ckpt, "BACKGROUND_MIN_BYTES", 0)
    threads, real = [], ckpt.save
    monkeypatch.setattr(ckpt, "save", lambda *a: threads.append(threading.current_thread().name) or real(*a))
    return threads


def test_background_checkpoints_stop_and_resume_bit_exactly(tmp_path, always_background):
    """A run stopped mid-epoch and resumed, every checkpoint written by the writer thread, ends
    with the weights, log and last checkpoint of an uninterrupted run written synchronously."""
    overrides = {"scheduler.epochs": 2}
    plain = make_run(tmp_path / "plain", **overrides)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ckpt, "BACKGROUND_MIN_BYTES", 1 << 40)  # this one synchronously
        train(plain, progress=False)
    del always_background[:]
    run = make_run(tmp_path / "bg", **overrides)
    trainer = Trainer(run, progress=False, stop_event=threading.Event())
    stop_during_step(trainer, 14, trainer.stop_event)
    with pytest.raises(Preempted, match="epoch 2 step 4"):
        trainer.fit()
    state = ckpt.load_latest(run)  # on disk when Preempted is raised (and saved_event set)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 4) and trainer.saved_event.is_set()
    del trainer
    train(run, progress=False)
    assert always_background and set(always_background) == {"imgclf-checkpoint"}
    assert _states_equal(*(torch.load(r / "model.pt", weights_only=True) for r in (plain, run)))
    a, b = (torch.load(r / ckpt.LATEST, weights_only=True) for r in (plain, run))
    timings = ("wall_seconds", "accum", "log_rows")  # seconds differ; the rest is the same state
    assert _states_equal({k: v for k, v in a.items() if k not in timings},
                         {k: v for k, v in b.items() if k not in timings})
    assert [r["train_loss"] for r in a["log_rows"]] == [r["train_loss"] for r in b["log_rows"]]
    assert [line.split(",")[:4] for line in (run / "train_log.csv").read_text().splitlines()] == \
        [line.split(",")[:4] for line in (plain / "train_log.csv").read_text().splitlines()]
    assert ckpt._verify(run / ckpt.LATEST) and ckpt._verify(run / ckpt.PREVIOUS)


def test_submit_returns_before_the_write_and_the_write_holds_the_state_of_that_moment(tmp_path, monkeypatch):
    """The writer copies the state when it is handed over: changes the training makes meanwhile
    (in place, as the optimizer does) are not in it. The next submit waits for the pending write."""
    release, started, real = threading.Event(), threading.Event(), ckpt.save

    def slow_save(*args):
        started.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(ckpt, "save", slow_save)
    writer = ckpt.BackgroundWriter(tmp_path, min_bytes=0)
    weights = torch.zeros(1000)
    after = []
    writer.submit({"w": weights, "epoch": 1, "rows": [{"epoch": 1}]}, after=lambda: after.append(1))
    assert started.wait(30) and writer.pending and not (tmp_path / ckpt.LATEST).exists()
    weights.add_(1.0)  # the next training step
    release.set()
    writer.submit({"w": weights, "epoch": 2, "rows": []})  # waits for the first, then writes the second
    writer.wait()
    assert after == [1] and not writer.pending
    latest = torch.load(tmp_path / ckpt.LATEST, weights_only=True)
    previous = torch.load(tmp_path / ckpt.PREVIOUS, weights_only=True)
    assert torch.equal(previous["w"], torch.zeros(1000)) and previous["rows"] == [{"epoch": 1}]
    assert torch.equal(latest["w"], torch.ones(1000)) and latest["epoch"] == 2


def test_a_failed_background_write_stops_the_run_at_the_next_checkpoint_point(tmp_path, monkeypatch,
                                                                              always_background):
    """The epoch-2 write fails on its thread; the run raises one line at its next checkpoint point
    (the end of training here), and the epoch-1 checkpoint is still the verified latest."""
    real = ckpt.save

    def failing(run_dir, state):
        if state["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return real(run_dir, state)

    monkeypatch.setattr(ckpt, "save", failing)
    run = make_run(tmp_path / "run", **{"scheduler.epochs": 3, "train.checkpoint_period": 2})
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        train(run, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{run / ckpt.LATEST}: writing the checkpoint failed")
    assert "No space left on device" in message
    assert ckpt.load_latest(run)["epoch"] == 0 and not (run / "result.json").exists()


def test_cpu_copy_copies_every_tensor_and_container():
    state = {"model": {"w": torch.ones(3)}, "opt": {"state": {0: {"m": torch.zeros(2)}}, "groups": [{"lr": 0.1}]},
             "rows": [{"epoch": 1}], "pair": (torch.ones(1), 2)}
    copy = ckpt.cpu_copy(state)
    assert _states_equal(copy, state)
    state["model"]["w"].add_(1)
    state["opt"]["state"][0]["m"].add_(1)
    state["rows"].append({"epoch": 2})
    assert copy["model"]["w"].tolist() == [1.0, 1.0, 1.0] and copy["opt"]["state"][0]["m"].tolist() == [0.0, 0.0]
    assert copy["rows"] == [{"epoch": 1}] and isinstance(copy["pair"], tuple)
    assert ckpt.tensor_bytes(state) == 4 * (3 + 2 + 1)
