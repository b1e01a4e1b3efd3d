"""DDP on CPU (gloo) with 2 ranks, via submitit's local executor and via torchrun.

Every rank augments the whole global batch from the same generator and keeps its shard, so
for a model without BatchNorm two ranks compute what one process computes at that batch:
the averaged gradient equals the full-batch gradient, up to float summation order."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_run
from imgclf.engine import train

# VGG without BN: the only difference between 1 and 2 ranks is the gradient all-reduce.
NO_BN = {"model.name": "vgg", "model.vgg.n_channels": [8, 16], "model.vgg.n_layers": [1, 1],
         "model.vgg.use_bn": False, "scheduler.epochs": 2, "train.batch_size": 64}


def close_weights(a, b):
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(wa[next(iter(wa))], torch.zeros_like(wa[next(iter(wa))]))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("single") / "run", **NO_BN)
    train(run, progress=False)
    return run


def only_rank0_wrote(run):
    names = sorted(p.name for p in run.iterdir() if p.is_file())
    assert not [n for n in names if n.endswith(".tmp")]
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2
    rows = (run / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + NO_BN["scheduler.epochs"]  # one header, one row per epoch, no duplicates


def test_two_ranks_with_submitit_local_executor(single, tmp_path):
    from imgclf.launch import Resources, run

    ddp = make_run(tmp_path / "ddp", **NO_BN, **{"train.dist.world_size": 2})
    result = run(ddp, launcher="local", resources=Resources(tasks=2, cpus_per_task=1, time_min=10), evaluate=True)
    assert result["world_size"] == 2
    close_weights(single, ddp)
    only_rank0_wrote(ddp)
    assert len(list((ddp / "submitit").glob("*_1_log.err"))) == 1  # two tasks ran
    # the same job scored the saved weights, on rank 0 only, agreeing with training's last evaluation
    score = json.loads((ddp / "eval.json").read_text())
    assert score["test_error"] == pytest.approx(result["test_error"], abs=1e-9)


def test_two_ranks_with_torchrun(single, tmp_path):
    ddp = make_run(tmp_path / "torchrun", **NO_BN, **{"train.dist.world_size": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "imgclf", "train", "--config", str(ddp / "config.yaml"), "--output-dir", str(ddp), "--quiet",
           "--resume", "train.distributed", "True"]
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    close_weights(single, ddp)
    only_rank0_wrote(ddp)


def _rank(rank: int, run: str, port: int, stop_after: int | None, out: str) -> None:
    """One gloo rank of a 2-rank Trainer; rank 0 alone is asked to stop after ``stop_after`` steps,
    as submitit asks global rank 0 alone when SLURM warns the job."""
    import threading

    import torch.distributed as dist

    from imgclf.engine import Preempted, Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    stop = threading.Event()
    t = Trainer(run, progress=False, stop_event=stop)
    t.resume()
    if rank == 0 and stop_after is not None:
        step, calls = t.step, []

        def counting_step(*args):
            calls.append(1)
            if len(calls) == stop_after:
                stop.set()
            return step(*args)

        t.step = counting_step
    try:
        t.fit()
        outcome = "finished"
    except Preempted:
        outcome = f"stopped at epoch {t.epoch} step {t.step_in_epoch}"
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(outcome)


def _two_ranks(run, port, stop_after, out):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(run), port, stop_after, str(out)), nprocs=2, join=True)
    return [(out / f"rank{r}").read_text() for r in range(2)]


def test_a_stop_heard_by_rank0_alone_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """The vote started at the first agreement point after the request (every STOP_CHECK_STEPS
    steps) is read at the next one: both ranks stop there, rank 0 saves the checkpoint, and
    resuming ends with the weights of an uninterrupted 2-rank run."""
    from imgclf.engine.trainer import STOP_CHECK_STEPS

    cfg = {**NO_BN, "train.dist.world_size": 2}
    whole = make_run(tmp_path / "whole", **cfg)
    assert _two_ranks(whole, 29531, None, tmp_path) == ["finished", "finished"]

    cut = make_run(tmp_path / "cut", **cfg)
    outcome = _two_ranks(cut, 29532, 3, tmp_path)  # asked during the 3rd step of epoch 1
    assert outcome == [f"stopped at epoch 0 step {2 * STOP_CHECK_STEPS}"] * 2
    assert not (cut / "result.json").exists()
    assert _two_ranks(cut, 29533, None, tmp_path) == ["finished", "finished"]
    a, b = (torch.load(r / "model.pt", weights_only=True) for r in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "train_log.csv").read_text().count("\n") == (cut / "train_log.csv").read_text().count("\n")


def test_the_stop_check_never_waits_for_its_all_reduce_nor_reads_the_device(tmp_path, monkeypatch):
    """At each check the vote started at the previous one is read (long complete) and the next one
    is started asynchronously, on CPU tensors: no rank blocks in it and nothing syncs the device."""
    import threading

    import torch.distributed as dist

    from imgclf.engine import Trainer
    from imgclf.engine.trainer import STOP_CHECK_STEPS

    t = Trainer(make_run(tmp_path / "run", **NO_BN), progress=False)
    ranks = t.ranks
    ranks.world_size, ranks.control = 2, None  # one process standing in for a rank of two
    calls = []

    class Work:
        def wait(self):
            calls.append("wait")

    def all_reduce(flag, op=None, group=None, async_op=False):
        assert async_op and flag.device.type == "cpu"
        calls.append(("start", float(flag[0])))
        return Work()

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    t.stop_event = threading.Event()
    checks = [ranks.stop_requested(step, t.stop_event) for step in range(0, 2 * STOP_CHECK_STEPS)]
    assert not any(checks) and calls == [("start", 0.0), "wait", ("start", 0.0)]
    t.stop_event.set()
    ranks._stop_vote[1].fill_(1.0)  # what the all-reduce of the other rank's flag would have brought
    calls.clear()
    assert ranks.stop_requested(2 * STOP_CHECK_STEPS, t.stop_event) and calls == ["wait"] \
        and ranks._stop_vote is None


def _failing_rank(rank: int, run: str, port: int, fail: str, out: str) -> None:
    """One rank of a 2-rank ``train()``; ``fail``: 'checkpoint' (rank 0's checkpoint write at the
    end of epoch 1 fails) or 'step' (rank 1 raises in its 5th step). Writes its outcome and when."""
    import time

    from imgclf.engine import checkpoint, step as engine_step

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if fail == "checkpoint" and rank == 0:
        save, calls = checkpoint.save, []

        def failing_save(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # the first is the initial state, the second epoch 1's
                raise OSError(28, "No space left on device")
            return save(*args, **kwargs)

        checkpoint.save = failing_save
    if fail == "step" and rank == 1:
        step, calls = engine_step.Step.__call__, []

        def failing_step(self, *args):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return step(self, *args)

        engine_step.Step.__call__ = failing_step
    try:
        train(run, progress=False)
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{time.time()}\n{outcome}")


@pytest.mark.parametrize("fail", ["checkpoint", "step"])
def test_an_exception_on_one_rank_stops_every_rank_within_seconds(tmp_path, fail):
    """A failed checkpoint write on rank 0: both ranks raise at the same point, rank 1 with rank 0's
    cause on one line. An exception inside a step of rank 1: its process group goes down with it,
    and rank 0's next collective fails at once (not after the group's 30-minute timeout)."""
    import time

    import torch.multiprocessing as mp

    run = make_run(tmp_path / "run", **NO_BN, **{"train.dist.world_size": 2})
    started = time.time()
    mp.spawn(_failing_rank, args=(str(run), 29541 + (fail == "step"), fail, str(tmp_path)), nprocs=2, join=True)
    ends, outcomes = zip(*((tmp_path / f"rank{r}").read_text().split("\n", 1) for r in range(2)))
    # about a second on an idle machine; the bound leaves room for a loaded one (the timeout is 30 min)
    assert abs(float(ends[0]) - float(ends[1])) < 60 and time.time() - started < 300
    if fail == "checkpoint":
        # the checkpoint writer names the file and keeps the write's own cause
        assert outcomes[0].startswith("CheckpointWriteError: ") and "No space left on device" in outcomes[0]
        assert outcomes[1].startswith(f"RankFailed: {run}: rank 0 failed writing the checkpoint: CheckpointWriteError")
        assert "No space left on device" in outcomes[1] and "\n" not in outcomes[1]
    else:
        assert outcomes[1] == "RuntimeError: CUDA error: an illegal memory access was encountered"
        assert outcomes[0] != "finished"
    assert not (run / "result.json").exists()


def test_the_process_group_is_destroyed_on_every_way_out_of_train(tmp_path, monkeypatch):
    """Building the trainer or resuming it can fail after the process group is up: train() still
    takes it down (a rank holding it open keeps the other ranks waiting)."""
    import torch.distributed as dist

    from imgclf.engine import trainer

    def one_rank_group(cfg, d, device):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    monkeypatch.setattr(trainer.distenv, "init_process_group", one_rank_group)
    mismatch = make_run(tmp_path / "mismatch", **NO_BN, **{"train.dist.world_size": 2})
    with pytest.raises(ValueError, match="train.dist.world_size is 2"):
        train(mismatch, progress=False)  # raised inside Trainer(), after the group was made
    assert not dist.is_initialized()

    (tmp_path / "store").unlink(missing_ok=True)
    monkeypatch.setattr(trainer.Trainer, "resume", lambda self: (_ for _ in ()).throw(OSError("stale NFS handle")))
    with pytest.raises(OSError, match="stale NFS handle"):
        train(make_run(tmp_path / "resume", **NO_BN), progress=False)
    assert not dist.is_initialized()
