"""Precision modes: fp32 (IEEE), tf32 (fp32 storage, TF32 tensor-core matmuls and convolutions
on Ampere and later), amp (fp16 autocast + GradScaler), bf16 (autocast), fp16 (pure half,
the reference README's apex O3). The reference passes only opt_level to apex, so its modes are
apex's defaults: O0 = fp32; O1 = amp (patched fp16 ops, dynamic loss scaling); O2 ("fp16
weights, fp32 master weights", BN in fp32, dynamic loss scaling) is run as amp, which is what
O2 approximates without apex; O3 = fp16: everything in fp16, BatchNorm included, no fp32
master weights and a static loss scale of 1.0 (no GradScaler)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str
    device: torch.device

    def __post_init__(self):
        if self.name == "fp16_master":
            self.name = "amp"
        # amp (fp16 autocast + GradScaler) runs on CPU too: slow, but the same code path as on a GPU.
        if self.device.type != "cuda" and self.name == "fp16":
            raise ValueError(
                f"train.precision {self.name} needs a CUDA device (pure fp16 training); "
                "on CPU use fp32, amp or bf16"
            )

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.float16 if self.name == "fp16" else torch.float32

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model_dtype

    @property
    def buffer_dtype(self) -> torch.dtype:
        """The dtype a resident input buffer holds (train.epoch_augmentation): under autocast the
        model's first convolution casts its input to the autocast dtype anyway, so rounding once
        when the buffer is made gives the same numbers at half the memory and bandwidth."""
        return {"amp": torch.float16, "bf16": torch.bfloat16}.get(self.name, self.input_dtype)

    def autocast(self):
        if self.name == "amp":
            return torch.autocast(self.device.type, dtype=torch.float16)
        if self.name == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_scaler(self) -> torch.amp.GradScaler:
        # Disabled for fp16: apex O3's static loss scale of 1.0.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "amp")

    def cast_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this mode's dtype, all of it: under fp16 (apex O3, keep_batchnorm_fp32
        False) BatchNorm's weights and running statistics are fp16 too, and the optimizer then
        steps these fp16 weights (no fp32 master copy). The reference's 19-76 % errors at large
        batches come from exactly this, so it is not "fixed" here."""
        return model.to(dtype=self.model_dtype)


def backend_flags(precision: str, device_type: str, deterministic: bool) -> dict[str, bool]:
    """The process-wide kernel policy of a run, as recorded in env.json.

    ``fp32`` means IEEE fp32: TF32 is switched off explicitly, because cuDNN allows it by
    default (so "fp32" convolutions on Ampere+ silently ran in TF32). ``tf32`` allows it.
    ``deterministic`` asks for deterministic algorithms with cuDNN autotuning off (bit-exact
    resume on CUDA); otherwise cuDNN benchmarks its algorithms on CUDA (fastest, not
    reproducible bit for bit)."""
    cuda = device_type == "cuda"
    return {"tf32": precision == "tf32", "cudnn_benchmark": cuda and not deterministic,
            "deterministic": deterministic}


def apply_backend_flags(flags: dict[str, bool]) -> None:
    import os

    torch.backends.cuda.matmul.allow_tf32 = flags["tf32"]
    torch.backends.cudnn.allow_tf32 = flags["tf32"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = flags["deterministic"]
    if flags["deterministic"]:
        # cuBLAS is deterministic only with a fixed workspace (read when its handle is created).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: an op without a deterministic CUDA kernel warns (once) instead of killing the run.
    torch.use_deterministic_algorithms(flags["deterministic"], warn_only=True)


def guard_fused_first_step(optimizer: torch.optim.Optimizer) -> None:
    """Fused SGD creates its momentum buffers with ``empty_like`` in its first step; when a
    GradScaler finds an inf/NaN there the kernel skips the step and leaves the buffers as
    uninitialized memory, used from then on. Zero buffers before the first step are
    bit-identical to torch's first-step initialization (0 * momentum + grad = grad)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") or not group.get("momentum"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
