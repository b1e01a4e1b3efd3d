"""Precision modes: fp32, amp (fp16 autocast + GradScaler), bf16 (autocast), fp16 (pure half,
the reference README's apex O3). apex O2 ("fp16 weights, fp32 master weights") is run as
amp: fp32 master weights with fp16 compute and dynamic loss scaling, which is what O2
approximates without apex."""
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
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "amp")
