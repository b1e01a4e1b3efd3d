"""What the benchmarks share: the device and its description, the precision to compare
against fp32, timed windows under a time budget, and peak memory.

Timing follows one rule everywhere: untimed warm-up steps first (compilation, oneDNN
primitive creation, cuDNN autotuning, the allocator), their time recorded on its own, then
``windows`` windows of ``steps`` steps, each window synchronized, reporting images per
second per window. When a time budget (``--max-seconds``, the timed windows only) cannot
hold that, fewer windows or steps are timed and the result says so.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (use cpu)")
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the machine
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_cpu_bf16() -> bool:
    """bf16 matrix instructions (AVX512-BF16 or AMX-BF16). Without them oneDNN emulates bf16
    through fp32 conversions and bf16 autocast is several times *slower* than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def best_precision(device: torch.device) -> str:
    """The fastest precision the device supports natively, in the engine's names."""
    if device.type == "cuda":
        return "amp"  # fp16 autocast + GradScaler: tensor cores on every CUDA GPU this targets
    return "bf16" if native_cpu_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "amp":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def device_title(device: torch.device) -> str:
    """The heading of a device's section in RESULTS.md; a re-run on the same device replaces it."""
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores"


def device_facts(device: torch.device) -> list[str]:
    facts = [f"torch {torch.__version__}"]
    try:
        import torchvision

        facts.append(f"torchvision {torchvision.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts += [f"{props.total_memory / 2**30:.0f} GiB", f"CUDA {torch.version.cuda}"]
    else:
        simd = torch.backends.cpu.get_cpu_capability()
        bf16 = "native bf16 (AVX512-BF16/AMX)" if native_cpu_bf16() else "no native bf16 (no AVX512-BF16/AMX)"
        facts += [f"{torch.get_num_threads()} torch threads", f"ISA {simd}", bf16]
    return facts


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- timing
@dataclass
class Timing:
    rates: list[float]  # items per second, one per timed window
    steps: int  # steps per window
    warmup: int  # warm-up steps actually run
    notes: list[str] = field(default_factory=list)
    first_step_seconds: float = 0.0  # the first (cold) step: compilation, autotuning, allocator
    warmup_seconds: float = 0.0  # all warm-up steps, the first included

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def spread(self) -> str:
        return f"{min(self.rates):.0f}–{max(self.rates):.0f}" if len(self.rates) > 1 else "—"

    @property
    def windows(self) -> str:
        return f"{len(self.rates)}×{self.steps}"


def time_windows(step: Callable[[], object], device: torch.device, *, items: int, warmup: int, windows: int,
                 steps: int, max_seconds: float | None = None) -> Timing:
    """Images per second of ``step`` (``items`` images each) over timed windows.

    The first ``warmup`` steps (at least one: a first step pays for compilation, autotuning and
    cuDNN's algorithm search) are never a measurement; their time is recorded on its own
    (``first_step_seconds``, ``warmup_seconds``) and does not count against ``max_seconds``,
    which budgets the timed windows alone: the steps per window shrink (to one at least) so
    that ``windows`` windows fit at the fastest warm-up step's pace, and windows stop when the
    budget is spent (at least one is always timed).
    """
    budget = max_seconds if max_seconds and max_seconds > 0 else float("inf")
    times = []
    for _ in range(max(warmup, 1)):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    pace = min(times)
    notes = []
    if windows * steps * pace > budget:
        fit = max(1, int(budget / (windows * pace)))
        if fit < steps:
            steps = fit
            notes.append(f"{steps} step(s) per window to fit --max-seconds {budget:g}")
    rates = []
    start = time.perf_counter()
    for w in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * items / (time.perf_counter() - t0))
        if time.perf_counter() - start > budget and w + 1 < windows:
            notes.append(f"{w + 1} of {windows} windows within --max-seconds {budget:g}")
            break
    return Timing(rates, steps, len(times), notes, first_step_seconds=times[0], warmup_seconds=sum(times))


def seconds_per_call(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of one call over ``reps`` timed calls, each synchronized."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- memory
def trim() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so that resident
    memory, and a peak measured from here, reflects what is in use rather than what an
    earlier measurement left cached."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def proc_kib_field(path: str, name: str) -> int | None:
    """Bytes of a ``Name:  N kB`` line of a /proc file (meminfo, self/status), if present."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int | None:
    """Bytes the kernel could give this process without swapping (MemAvailable), if known."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory of what runs between ``reset()`` and ``read()``.

    CUDA: the allocator's max allocated bytes. CPU: the process's peak resident set
    (VmHWM), which Linux lets a process reset by writing 5 to /proc/self/clear_refs;
    where it cannot, the lifetime peak (getrusage) is reported instead and marked.
    Either way it is this process only: DataLoader workers are processes of their own.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated; CPU: resident)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return proc_kib_field("/proc/self/status", "VmRSS") or 0

    def read(self) -> int:
        """Bytes."""
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        peak = proc_kib_field("/proc/self/status", "VmHWM") if self.exact else None
        if peak is not None:
            return peak
        self.exact = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def label(self) -> str:
        if self.device.type == "cuda":
            return "max allocated (CUDA)"
        return "peak RSS of this process" if self.exact else "lifetime peak RSS of this process (getrusage)"


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"
