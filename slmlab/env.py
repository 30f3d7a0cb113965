"""What this machine really has: the facts that decide dtypes, threads and devices.

On a CPU without native bf16 (AVX2 machines, most laptops) a bf16 matmul is hundreds of times
slower than fp32, so slmlab never picks a dtype by habit: it asks here. CPU feature flags are
not enough to decide: a virtual machine can report `avx512_bf16` and still emulate it, so the
answer for the CPU is measured.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

__all__ = [
    "best_seconds",
    "bf16_is_fast",
    "cache_dir",
    "cpu_flags",
    "cpu_model",
    "default_dtype",
    "matmul_gflops",
    "pick_device",
    "report",
]


def cache_dir() -> Path:
    """slmlab's cache (compiled kernels, zoo models, task files): ``$SLMLAB_HOME`` or
    ``~/.cache/slmlab``."""
    return Path(os.environ.get("SLMLAB_HOME", Path.home() / ".cache" / "slmlab"))


@cache
def memory_bytes(device: str | torch.device = "cpu") -> int:
    """How much memory `device` has in all: the machine's RAM, or a GPU's own."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's name as the kernel reports it ("AMD EPYC ...", "Intel(R) Xeon(R) ..."): a
    figure measured on one CPU says which. The architecture where the name cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_seconds(
    call: Callable[[], object], *, repeats: int | None = None, seconds: float | None = None
) -> float:
    """The shortest time of one `call`: of `repeats` calls (5 if neither is given), and, given
    `seconds`, of as many more as that long takes (one at least). The best, not the mean: a
    ceiling, since on a shared machine other work comes and goes. Warm up (the first call's
    allocations) before."""
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats {repeats}: time one call at least")
    least = repeats if repeats is not None else (1 if seconds is not None else 5)
    times: list[float] = []
    started = time.perf_counter()

    def more() -> bool:
        if len(times) < least:
            return True
        return seconds is not None and time.perf_counter() - started < seconds

    while more():
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 256, seconds: float = 0.05) -> float:
    """Measured CPU matmul throughput for square `n`×`n` products in `dtype`, in GFLOP/s."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first calls pay for dispatch and allocation
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / elapsed / 1e9


@cache
def bf16_is_fast(device: str = "cpu") -> bool:
    """Whether bf16 matrix products run at least half as fast as fp32 on `device`."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    return matmul_gflops(torch.bfloat16) >= 0.5 * matmul_gflops(torch.float32)


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The compute dtype for mixed precision on `device`: bf16 where it is fast, otherwise fp32."""
    return torch.bfloat16 if bf16_is_fast(str(device)) else torch.float32


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA if present, else CPU; asking for an absent CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} was asked for but no CUDA device is available "
            f"(torch {torch.__version__}); use --device cpu or --device auto"
        )
    return dev


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, object]:
    """The environment in one dict: attach it to every result and every bug report."""
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_simd": simd,
        "cpu_fp32_gflops": round(matmul_gflops(torch.float32), 1),
        "cpu_bf16_fast": bf16_is_fast("cpu"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("slmlab", "torch", "numpy", "safetensors", "tokenizers", "transformers"):
        info[pkg] = _version(pkg)
    return info
