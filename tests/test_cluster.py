"""What goes wrong only with several ranks or under SLURM's clock, on CPU (gloo, 2 ranks):
ranks agree on a divergence, result.json and eval.json agree on the test error, and a
preempted job's checkpoint wait fits inside SLURM's warning."""
import datetime
import json
import os

import pytest
import torch

from conftest import make_run

NO_BN = {"model.name": "vgg", "model.vgg.n_channels": [8, 16], "model.vgg.n_layers": [1, 1],
         "model.vgg.use_bn": False, "scheduler.epochs": 1, "train.batch_size": 64, "train.log_period": 2,
         "train.dist.world_size": 2}


def _rank(rank: int, run: str, port: int, inf_on_rank1_at: int | None, out: str) -> None:
    import torch.distributed as dist

    from imgclf.engine import Diverged, Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in an all-reduce fails the test in seconds, not 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    outcome = "?"
    try:
        t = Trainer(run, progress=False)
        if rank == 1 and inf_on_rank1_at is not None:
            step = t.step

            def poisoned(*args):
                loss, correct = step(*args)
                if t.step_in_epoch == inf_on_rank1_at:
                    loss = loss * float("inf")
                return loss, correct

            t.step = poisoned
        result = t.fit()
        outcome = f"diverged in epoch {result['diverged_at_epoch']}" if result.get("diverged") else "finished"
        if result.get("diverged"):
            outcome += f": {result['message'].split('by ')[1].split(' (')[0]}"
    except Diverged as e:
        outcome = f"raised {e}"
    except Exception as e:  # noqa: BLE001 - reported to the test
        outcome = f"error {type(e).__name__}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(outcome)


def _two_ranks(run, port, inf_at, out):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(str(run), port, inf_at, str(out)), nprocs=2, join=True)
    return [(out / f"rank{r}").read_text() for r in range(2)]


def test_a_divergence_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Defect 6: the check was per rank, so rank 1 raised while rank 0 waited in the next
    all-reduce (with NCCL: until the time limit)."""
    run = make_run(tmp_path / "run", **NO_BN)
    outcome = _two_ranks(run, 29561, 3, tmp_path)  # rank 1's loss is inf in step 3 (checked at step 4)
    assert outcome == ["diverged in epoch 1: step 4"] * 2
    assert json.loads((run / "result.json").read_text())["diverged"] is True


def test_result_json_and_eval_json_report_one_test_error_under_ddp(tmp_path):
    """Defect 10: with BatchNorm each rank's running statistics last saw its own shard; the
    training's sharded evaluation used them, `imgclf evaluate` the saved (rank 0's) ones, and in
    another memory format."""
    from imgclf.engine.evaluator import evaluate_run

    run = make_run(tmp_path / "run", **{"train.dist.world_size": 2, "scheduler.epochs": 1})
    assert _two_ranks(run, 29562, None, tmp_path) == ["finished"] * 2
    result = json.loads((run / "result.json").read_text())
    score = evaluate_run(run)
    assert score["test_error"] == result["test_error"]
    assert score["test_loss"] == pytest.approx(result["test_loss"], rel=1e-6)


class _NeverSaved:
    def __init__(self):
        self.timeout = None

    def wait(self, timeout=None):
        self.timeout = timeout
        return False

    def set(self):
        pass


@pytest.mark.parametrize("delay", [90, 30])
def test_a_preempted_job_waits_for_its_checkpoint_less_than_slurms_warning(tmp_path, delay):
    """Defect 7: rank 0 waited up to 120 s for the checkpoint, SLURM's signal comes 90 s early."""
    import threading

    import submitit  # noqa: F401 - a runtime dependency: its absence fails, never skips
    from imgclf.launch import TrainJob

    job = TrainJob(tmp_path, signal_delay_s=delay)
    job._stop, job._saved = threading.Event(), _NeverSaved()
    again = job.checkpoint()
    assert job._stop.is_set() and 0 < job._saved.timeout <= delay - 15
    assert again.function.signal_delay_s == delay  # the requeued job keeps its deadline


def test_submit_hands_the_job_its_signal_delay(tmp_path, monkeypatch):
    import submitit  # noqa: F401 - a runtime dependency: its absence fails, never skips

    import imgclf.launch as launch

    submitted = []

    class FakeExecutor:
        def update_parameters(self, **kw):
            pass

        def submit(self, job):
            submitted.append(job)

    for name in ("slurm", "local"):
        monkeypatch.setattr(type(launch.get(name)), "executor", lambda *a: FakeExecutor())
    launch.submit(tmp_path, "slurm", launch.Resources(signal_delay_s=120))
    launch.submit(tmp_path, "local", launch.Resources(signal_delay_s=120))
    assert [j.signal_delay_s for j in submitted] == [120, 30]  # local: submitit's delay is capped at 30 s
