"""Helpers shared by the benchmarks: machine facts measured in the same run, and JSON output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slmlab.env import report
from slmlab.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Main-memory read bandwidth: the best of a few sums over a buffer far larger than cache."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write(name: str, result: dict) -> Path:
    result = {"benchmark": name, "machine": report(), **result}
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path
