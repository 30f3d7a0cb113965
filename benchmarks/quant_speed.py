"""One weight-only quantized linear layer on CPU, every path in the same run.

    python -m benchmarks.quant_speed [--size 4096] [--batches 1,4,64] [--repeats 20]

Times y = x Wᵀ for a square fp32 weight and for the same weight in 4 bits (group 128): fp32
``F.linear`` (MKL) and slmlab's fp32 gemv, slmlab's int4 kernel, PyTorch's own
``_weight_int4pack_mm_for_cpu``, and bitsandbytes' ``Linear4bit`` (NF4) and ``Linear8bitLt``,
at batch 1 (decoding) and larger batches (prefill), per layer, in passes over as many distinct
layers as it takes for their 4-bit copies to fill the last-level cache four times (as many as
half the free memory holds, if fewer). The goal:
int4 at batch 1 ≥ 3× faster than fp32, and at batch 64 no slower than 1.5× fp32. Writes
benchmarks/results/quant_speed.json.

``--as-avx2`` times the same paths as an AVX2 CPU without AVX-512 runs them (most laptops and
many servers): it runs itself again with AVX-512 switched off in PyTorch's kernels, MKL, oneDNN
and bitsandbytes, and slmlab's kernels compiled for ``x86-64-v3`` (AVX2 + FMA, no VNNI).
Writes benchmarks/results/quant_speed_avx2.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import bitsandbytes_layer, write
from slmlab import kernels
from slmlab.devices import last_level_cache_bytes, read_bandwidth_gbs
from slmlab.quant import pack_int4, quantize


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_int4(weight: torch.Tensor, group: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """PyTorch's CPU int4 matmul (what torchao's int4 layout calls), or None if absent."""
    try:
        q = quantize(weight, "int", 4, group_size=group, symmetric=False)
        codes = q.codes.to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # PyTorch's int4 grid: w = (q − 8) · scale + zero, per group of the input dimension.
        scales = q.scales.t().contiguous()
        zeros = ((8 - q.zeros.float()) * q.scales).t().contiguous()
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).contiguous()
        fn = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
            x, packed, group, scales_and_zeros
        )
        fn(torch.randn(1, weight.shape[1]))
        return fn
    except (RuntimeError, AttributeError):
        return None


# What each library reads to cap its instruction set (set before it loads, hence a new process).
AVX2_ONLY = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL: fp32 F.linear
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: PyTorch's int8 and bf16 matmuls
    "SLMLAB_CPU_ARCH": "x86-64-v3",  # slmlab's kernels: AVX2 + FMA
}


def available_memory_bytes() -> int:
    """Memory the kernel says can be had without swapping (Linux's MemAvailable), else free."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def layer_paths(weight: torch.Tensor, group: int, as_avx2: bool) -> dict[str, Callable]:
    """Every path's ``x -> x @ weight.T`` for one weight (the paths this machine has)."""
    q = quantize(weight, "int", 4, group_size=group)
    packed = pack_int4(q.codes)
    paths: dict[str, Callable] = {
        "fp32 F.linear": lambda x: F.linear(x, weight),
        "slmlab fp32 gemv": lambda x: kernels.gemv(x, weight),
        "slmlab int4": lambda x: kernels.int4_linear(x, packed, q.scales, None, group),
    }
    pytorch_int4 = torch_int4(weight, group)
    if pytorch_int4 is not None:
        paths["PyTorch _weight_int4pack_mm_for_cpu"] = pytorch_int4
    for name, kind in (
        ("bitsandbytes Linear4bit nf4", "nf4"),
        ("bitsandbytes Linear8bitLt", "int8"),
    ):
        layer = bitsandbytes_layer(weight, kind, avx512_bf16=not as_avx2)
        if layer is not None:
            paths[name] = layer
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batches", default="1,4,64")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--layers",
        type=int,
        help="default: 4-bit copies 4x the last-level cache, in half the memory",
    )
    parser.add_argument("--as-avx2", action="store_true", help="time an AVX2 CPU's paths")
    args = parser.parse_args()
    if args.as_avx2 and any(os.environ.get(k) != v for k, v in AVX2_ONLY.items()):
        argv = [sys.executable, "-m", "benchmarks.quant_speed", *sys.argv[1:]]
        sys.exit(subprocess.run(argv, env={**os.environ, **AVX2_ONLY}).returncode)
    if args.as_avx2 and torch.backends.cpu.get_cpu_capability() != "AVX2":
        sys.exit(f"--as-avx2: PyTorch still dispatches {torch.backends.cpu.get_cpu_capability()}")
    torch.manual_seed(0)
    n = args.size
    int4_bytes = n * n // 2 + n * (n // args.group_size) * 4
    # A decoder reads each layer's weights once per token, and all of them do not fit in cache:
    # one 4096² layer in 4 bits (8.9 MB) does, so timing it alone would time the cache. Each
    # pass goes through distinct layers whose 4-bit copies fill the cache several times over.
    cache_bytes = last_level_cache_bytes()
    layers = args.layers or max(1, math.ceil(4 * cache_bytes / int4_bytes))
    # ... within half the free memory: a layer holds about 8 bytes a weight in all (the fp32
    # weight, its int4 copies and bitsandbytes' NF4 and int8 ones). A virtual machine that
    # reports a 480 MiB cache asked for 213 layers, and the process was killed for memory.
    layers = min(layers, max(1, available_memory_bytes() // 2 // (8 * n * n)))
    per_layer = [
        layer_paths(torch.randn(n, n) * 0.02, args.group_size, args.as_avx2) for _ in range(layers)
    ]
    paths = {name: [p[name] for p in per_layer] for name in per_layer[0]}
    bandwidth = read_bandwidth_gbs()
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, n)
            row = {}
            for name, fn in paths.items():
                if name == "slmlab fp32 gemv" and batch > 4:
                    continue  # not the kernel's domain: it would time F.linear again
                repeats = args.repeats if "bitsandbytes" not in name else max(3, args.repeats // 4)
                if name.startswith("PyTorch") and batch > 4:
                    repeats = 1  # about a second a layer: one pass tells
                one_pass = lambda fns=fn, x=x: [f(x) for f in fns]  # noqa: E731
                row[name] = round(median_ms(one_pass, repeats) / layers, 3)
            row["int4 speed-up over fp32"] = round(row["fp32 F.linear"] / row["slmlab int4"], 2)
            results[f"batch {batch}"] = row
            print(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    weight_mb = {"fp32": n * n * 4 / 1e6, "int4": int4_bytes / 1e6}
    path = write(
        "quant_speed_avx2" if args.as_avx2 else "quant_speed",
        {
            "settings": {
                "size": n,
                "group_size": args.group_size,
                "threads": torch.get_num_threads(),
                "layers_per_pass": layers,
                "last_level_cache_bytes": cache_bytes,
                "instruction_sets": (
                    {**AVX2_ONLY, "bitsandbytes": "AVX-512-BF16 kernel off"}
                    if args.as_avx2
                    else "all this CPU has"
                ),
            },
            "read_bandwidth_gbs": round(bandwidth, 1),
            "weight_megabytes": weight_mb,
            # MB ÷ GB/s = ms: the time to read the weight once, the floor of a batch-1 product
            "roofline_ms_batch1": {k: round(v / bandwidth, 3) for k, v in weight_mb.items()},
            "milliseconds": results,
            "goal": "int4 >= 3x fp32 at batch 1; int4 <= 1.5x fp32 time at batch 64",
        },
    )
    print(path)


if __name__ == "__main__":
    main()
