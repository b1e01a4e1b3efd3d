"""Precision modes: fp32, amp (fp16 autocast + GradScaler), bf16 (autocast), fp16 (pure half,
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
        if self.device.type != "cuda" and self.name in ("amp", "fp16"):
            raise ValueError(
                f"train.precision {self.name} needs a CUDA device (fp16 kernels and loss scaling); "
                "on CPU use fp32 or bf16"
            )

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.float16 if self.name == "fp16" else torch.float32

    @property
    def input_dtype(self) -> torch.dtype:
        return self.model_dtype

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
