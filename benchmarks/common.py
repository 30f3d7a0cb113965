"""Helpers shared by the benchmarks: machine facts measured in the same run, and JSON output."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from slmlab.env import report
from slmlab.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
# Material from outside the project (../shared/README.md), where this checkout has it.
SHARED = Path(os.environ.get("SLMLAB_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def gutenberg_openings(chars: int) -> list[str] | None:
    """About `chars` characters in all: the opening of each 32nd of the held-out file, which
    holds the first ~60k characters of each of 32 books in turn (None without the file)."""
    path = SHARED / "data" / "gutenberg" / "gutenberg_en_val.txt"
    if not path.is_file():
        return None
    text = path.read_text()
    per_book = max(1, chars // 32)
    size = len(text) // 32
    return [text[i * size : i * size + per_book] for i in range(32)]


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bitsandbytes_layer(
    weight: torch.Tensor, kind: str, *, avx512_bf16: bool = True
) -> torch.nn.Module | None:
    """`weight` (out, in) as bitsandbytes' layer of `kind` (``nf4``, ``int8``), made by
    `slmlab.quant.bnb.bitsandbytes_` on the weight's device and in its dtype; None without
    bitsandbytes installed. ``avx512_bf16=False`` keeps a 4-bit layer off bitsandbytes' fused
    AVX-512-BF16 CPU kernel, on the path it takes on CPUs without that instruction set."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    from slmlab.quant.bnb import bitsandbytes_

    linear = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its notices about casting inputs
        layer = bitsandbytes_(torch.nn.Sequential(linear), kind, skip=())[0]
    if not avx512_bf16 and hasattr(layer, "support_avx512bf16_for_cpu"):
        # Linear4bit asks the CPU once, at construction, and repacks for that kernel on its
        # first forward; with the flag off it dequantizes and multiplies, as on AVX2 CPUs.
        layer.support_avx512bf16_for_cpu = False
    return layer


def write(name: str, result: dict) -> Path:
    result = {"benchmark": name, "machine": report(), **result}
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path
