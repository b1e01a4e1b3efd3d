"""Precision on the real training step, on CPU: AMP (fp16 autocast + GradScaler), bf16 autocast,
the fp32/tf32 policy, the deterministic switch, fused SGD under a GradScaler, torch.compile."""
import json
import os
import subprocess
import sys
import logging
import threading

import pytest
import torch

from conftest import make_run, stop_during_step
from imgclf.engine import Preempted, Trainer, train
from imgclf.engine.precision import backend_flags
from imgclf.engine.step import Step


@pytest.fixture(autouse=True)
def _restore_backend_flags():
    """The trainer sets process-wide kernel flags; leave them as found for the other tests."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def state_of(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- AMP and bf16 on CPU
class _InfGradient(torch.autograd.Function):
    """Identity forward; an inf gradient backward (an fp16 overflow of the scaled gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _overflow_at(monkeypatch, step: int, seen_dtypes: list):
    """Inf gradients, finite loss at the run's ``step``-th optimizer step (0-based, as its scheduler
    counts them): the GradScaler must skip that step and halve its scale."""
    original = Step.loss

    def loss(self, logits, targets, views=1):
        seen_dtypes.append(logits.dtype)
        if self.scheduler.last_epoch == step:
            logits = _InfGradient.apply(logits)
        return original(self, logits, targets, views)

    monkeypatch.setattr(Step, "loss", loss)


def test_amp_fp16_with_grad_scaler_trains_on_cpu_and_its_scale_survives_a_resume(tmp_path, monkeypatch):
    dtypes = []
    _overflow_at(monkeypatch, 2, dtypes)  # epoch 1, step 3
    cfg = {"train.precision": "amp", "scheduler.epochs": 2}
    whole = Trainer(make_run(tmp_path / "whole", **cfg), progress=False)
    result = whole.fit()
    assert set(dtypes) == {torch.float16}  # the model ran under fp16 autocast
    assert whole.scaler.is_enabled() and whole.scaler.get_scale() == 2.0 ** 15  # 65536 halved once
    assert result["precision"] == "amp" and 0 <= result["test_error"] < 90

    cut_dir = make_run(tmp_path / "cut", **cfg)
    stop = threading.Event()
    cut = Trainer(cut_dir, progress=False, stop_event=stop)
    stop_during_step(cut, 14, stop)  # epoch 2, step 4
    with pytest.raises(Preempted):
        cut.fit()
    saved = torch.load(cut_dir / "checkpoint.pt", weights_only=True)["scaler"]
    assert saved["scale"] == 2.0 ** 15 and saved["_growth_tracker"] > 0
    resumed = Trainer(cut_dir, progress=False)
    assert resumed.resume()
    resumed.fit()
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()
    assert_equal_states(state_of(resumed), state_of(whole))


def test_bf16_autocast_runs_the_real_step_on_cpu(tmp_path, monkeypatch):
    dtypes = []
    _overflow_at(monkeypatch, -1, dtypes)  # records dtypes only
    run = make_run(tmp_path / "run", **{"train.precision": "bf16", "scheduler.epochs": 2})
    result = train(run, progress=False)
    assert set(dtypes) == {torch.bfloat16}
    losses = [float(line.split(",")[2]) for line in (run / "train_log.csv").read_text().splitlines()[1:]]
    assert result["precision"] == "bf16" and losses[1] < losses[0] < 2.31  # ln(10) = 2.30 at chance


# --------------------------------------------------------------------------- defect 4: fused SGD + GradScaler
def test_fused_sgd_whose_first_step_overflows_keeps_a_clean_momentum(tmp_path, monkeypatch):
    """Fused SGD made its momentum buffers with empty_like in the first step; a GradScaler
    skipping that step left uninitialized memory as momentum. Fused SGD runs on CPU too, so the
    test forces it there (the builder picks it for CUDA parameters)."""
    import imgclf.optim.build as build

    monkeypatch.setattr(build, "_multi_tensor_kwargs", lambda groups: {"fused": True})
    dtypes = []
    _overflow_at(monkeypatch, 0, dtypes)
    t = Trainer(make_run(tmp_path / "run", **{"train.precision": "amp"}), progress=False)
    assert t.optimizer.param_groups[0]["fused"]
    images, labels = next(iter(t.loader.batches(0)))[1:]
    batch = t.train_transform(images, labels, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in t.model.parameters()]
    t.step(batch)  # overflows: skipped
    assert t.scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), before))
    for p in t.model.parameters():
        assert torch.equal(t.optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))
    # The next (finite) step is torch's first momentum step: buffer = gradient (+ weight decay).
    t.step(batch)
    for p in t.model.parameters():
        assert torch.isfinite(t.optimizer.state[p]["momentum_buffer"]).all()
        assert t.optimizer.state[p]["momentum_buffer"].abs().max() < 100


# --------------------------------------------------------------------------- defects 8, 9: kernel policy
@pytest.mark.parametrize("precision,device,deterministic,flags", [
    ("fp32", "cuda", False, {"tf32": False, "cudnn_benchmark": True, "deterministic": False}),
    ("tf32", "cuda", False, {"tf32": True, "cudnn_benchmark": True, "deterministic": False}),
    ("amp", "cuda", True, {"tf32": False, "cudnn_benchmark": False, "deterministic": True}),
    ("tf32", "cuda", True, {"tf32": True, "cudnn_benchmark": False, "deterministic": True}),
    ("fp32", "cpu", False, {"tf32": False, "cudnn_benchmark": False, "deterministic": False}),
])
def test_backend_flags_of_each_precision_device_and_switch(precision, device, deterministic, flags):
    assert backend_flags(precision, device, deterministic) == flags


def test_fp32_means_ieee_fp32_tf32_is_its_own_precision_and_env_json_says_which(tmp_path):
    """Defect 8: cuDNN allows TF32 by default, so 'fp32' convolutions ran in TF32 on Ampere+."""
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    run = make_run(tmp_path / "fp32", **{"scheduler.epochs": 1})
    train(run, progress=False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    env = json.loads((run / "env.json").read_text())
    assert (env["precision"], env["tf32"], env["deterministic"]) == ("fp32", False, False)
    Trainer(make_run(tmp_path / "tf32", **{"train.precision": "tf32"}), progress=False)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_deterministic_switch_turns_on_deterministic_algorithms_and_is_recorded(tmp_path):
    """Defect 9: a train.deterministic switch (deterministic kernels, cuDNN autotuning off)."""
    run = make_run(tmp_path / "det", **{"train.deterministic": True, "scheduler.epochs": 1})
    train(run, progress=False)
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert json.loads((run / "env.json").read_text())["deterministic"] is True


# --------------------------------------------------------------------------- defect 5: torch.compile
def _lazy_compile(fails: bool, calls: list):
    """A stand-in for torch.compile: returns at once, and (like it) fails only when first called."""
    def compile_(module, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            if fails:
                raise RuntimeError("InductorError: no working C++ compiler\nsecond line")
            return module(*args, **kw)
        return compiled
    return compile_


def test_a_compile_failure_falls_back_to_eager_before_the_first_step(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(torch, "compile", _lazy_compile(True, calls))
    run = make_run(tmp_path / "run", **{"train.compile": True, "scheduler.epochs": 1})
    with caplog.at_level(logging.WARNING):
        t = Trainer(run, progress=False)
    assert calls == [1] and t.step_model is t.ddp_model
    assert "torch.compile failed" in caplog.text and "second line" not in caplog.text
    assert t.fit()["epochs"] == 1


def test_the_compile_probe_leaves_the_run_bit_identical_to_eager(tmp_path, monkeypatch):
    eager = train(make_run(tmp_path / "eager", **{"scheduler.epochs": 1}), progress=False)
    calls = []
    monkeypatch.setattr(torch, "compile", _lazy_compile(False, calls))
    run = make_run(tmp_path / "compiled", **{"train.compile": True, "scheduler.epochs": 1})
    compiled = train(run, progress=False)
    assert len(calls) > 1  # the probe and the training steps went through the "compiled" model
    a = torch.load(tmp_path / "eager" / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert_equal_states(a, b)  # BN statistics and weights untouched by the probe batch
    assert compiled["test_error"] == eager["test_error"]


def test_compile_caches_go_into_the_run_directory_so_a_requeue_reuses_them(tmp_path, monkeypatch):
    """train.compile points inductor's cache (FX graphs, kernels, Triton autotuning) at
    RUN/compile_cache before the first compile: the requeued job of the same run directory finds
    what the first attempt compiled."""
    from imgclf.engine import assembly

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(assembly, "_USER_INDUCTOR_CACHE", None)
    seen = []
    lazy = _lazy_compile(False, [])
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
                        or lazy(m, **kw))
    run = make_run(tmp_path / "run", **{"train.compile": True, "scheduler.epochs": 1})
    Trainer(run, progress=False)
    cache = run.resolve() / assembly.COMPILE_CACHE
    assert seen == [str(cache)]
    # A folder the user chose before imgclf was imported is left as it is.
    monkeypatch.setattr(assembly, "_USER_INDUCTOR_CACHE", str(tmp_path / "mine"))
    assert assembly.use_run_compile_cache(run) == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)


@pytest.mark.slow
def test_a_fresh_process_loads_the_kernel_an_earlier_one_compiled_into_the_cache(tmp_path):
    """What RUN/compile_cache buys a requeued job: a real (tiny) inductor compile writes its
    kernel there, and a fresh process pointed at the same folder loads it (an FX graph cache
    hit) instead of compiling it again."""
    cache = tmp_path / "run" / "compile_cache"
    program = ("import torch\nfrom torch._dynamo.utils import counters\n"
               "torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(8))\n"
               "print(sorted(counters['inductor']))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    runs = [subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=env)
            for _ in range(2)]
    assert [(r.stdout.strip().splitlines() or [""])[-1] for r in runs] == \
        ["['fxgraph_cache_miss']", "['fxgraph_cache_hit']"], [r.stderr[-500:] for r in runs]
    assert any(p.is_file() for p in cache.rglob("*"))
