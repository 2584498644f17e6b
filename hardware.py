"""The machine a run uses: which device, which precision, and how fast it multiplies matrices.

    --device auto       CUDA when a GPU is present, else the CPU
    --precision auto    on a CPU, bf16 where it multiplies bf16 natively (AVX512-BF16 or AMX)
                        and a product at the step's shapes is measured faster in bf16 than in
                        fp32; fp32 elsewhere, and on a GPU, where a step of these small
                        networks waits on kernel launches, not products (README, "Speed")

A step's costliest products are the decoder's output layer under enumeration of y: rows of
(digits x batch) by hidden_dim by 784 pixels, forward and the two backward products. The
same shapes measure the matrix-multiply rate that `benchmark.py speed` divides by.
"""

from __future__ import annotations

import ctypes
import platform
import time
from functools import cache
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 products on x86
# bf16 must beat fp32 by this factor at the step's shapes to be chosen: a margin that keeps a
# noisy measurement from flipping the choice between two runs on the same machine.
BF16_MIN_SPEEDUP = 1.2


class DeviceError(RuntimeError):
    """A device or precision that this machine cannot provide; the message says which to use."""


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@cache
def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a virtual machine may name
    only "AMD EPYC"; family 25 is Zen 3 or 4, family 26 Zen 5), else what platform knows."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def describe(device: torch.device) -> str:
    """One line naming the hardware: model, the ISA flags that decide speed, threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in cpu_flags()]
    return (f"{cpu_model()}, {platform.machine()} with {' '.join(isa) or 'no AVX'}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


# glibc's mallopt parameters: large blocks come from the heap, not fresh mmaps, up to this size,
# and freed heap memory is kept for reuse rather than handed back to the kernel.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit; a step's biggest tensor (10 x 200 x 784 floats) is 6 MB
TRIM_THRESHOLD = 1 << 30


@cache  # a process-wide setting: every Trainer asks, the first call makes it
def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed tensors' memory instead of returning it to the kernel.

    By default glibc returns a step's multi-megabyte tensors to the kernel and maps them afresh,
    and each page faults on first touch: about 2300 page faults and 2.5-3.8 ms of kernel time
    per training step on the Xeon (README, "Speed"). Returns False, changing nothing, where
    there is no glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@cache  # as keep_freed_memory: process-wide
def flush_denormals() -> bool:
    """Treat denormal floats (below 1.2e-38 in fp32) as zero on the CPU, as inputs and as
    results (x86's DAZ and FTZ; torch.set_flush_denormal).

    Late in training, Adam's moments for weights that almost never get a gradient (those of
    MNIST's blank border pixels) decay through the denormal range, where each operation on
    them takes a slow microcode path: 3% of the moments at epoch 137 of a 100-label run, and
    steps 1.37 times as long as with them flushed (README, "Speed"). Nothing a run can resolve
    is that small. The mode belongs to each thread and a thread inherits it when it starts, so
    the entry points (run.py, benchmark.py, a worker of run.py compare) set it before torch
    starts its threads; a Trainer sets it too, which reaches at least its own thread.
    Returns False where the CPU has no such mode.
    """
    return torch.set_flush_denormal(True)


def choose_device(name: str) -> torch.device:
    """--device: auto, cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible to this torch "
                          f"({torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware rather than emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def step_shapes(batch_size: int, hidden_dim: int, pixels: int = 784, digits: int = 10) -> list[tuple[int, int, int]]:
    """(m, k, n) of the decoder output layer's three products in one enumerated step."""
    rows = digits * batch_size
    return [(rows, hidden_dim, pixels), (rows, pixels, hidden_dim), (hidden_dim, rows, pixels)]


def matmul_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
                repeats: int = 10) -> float:
    """FLOP per second of the products `shapes` (each m x k times k x n), best of `repeats`."""
    pairs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
             for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up oneDNN's kernel cache
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for a, b in pairs:
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return flops / best


def choose_precision(name: str, device: torch.device, batch_size: int, hidden_dim: int) -> tuple[str, str]:
    """--precision: (bf16 or fp32, the reason in words)."""
    if name != "auto":
        return name, "as asked"
    if device.type == "cuda":
        # Measured on an H200: bf16 18.5 -> 21.2 ms per step, as autocast's casts add launches.
        return "fp32", "a GPU step here is bound by kernel launches, where bf16's casts only add more"
    if not native_bf16(device):
        return "fp32", "this device has no native bf16 products"
    shapes = step_shapes(batch_size, hidden_dim)
    ratio = matmul_rate(shapes, torch.bfloat16, device) / matmul_rate(shapes, torch.float32, device)
    if ratio >= BF16_MIN_SPEEDUP:
        return "bf16", f"native bf16, {ratio:.1f}x the fp32 rate at the step's shapes"
    return "fp32", f"native bf16 but only {ratio:.1f}x the fp32 rate at the step's shapes"
