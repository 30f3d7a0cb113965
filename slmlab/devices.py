"""Where a small model runs, and how fast it can: a catalogue of devices and the roofline.

A token of decoding reads every weight once and the whole KV cache once, and does about two
operations per weight. A device has a memory bandwidth B (bytes/s) and a peak compute C
(operations/s), so one token takes at least ``max(bytes / B, flops / C)``: the *roofline*.
At batch 1, bytes/flops is about one byte per two operations for 4-bit weights and two bytes
for fp32, while every device here can do tens of operations per byte it reads: decoding is
bound by memory, and tokens/s is bandwidth ÷ model bytes. Prefill (the prompt, all tokens in
one pass) reads the weights once for many tokens and is bound by compute instead.

The catalogue's figures are the makers' published peaks (the source is named with each), or
are computed from published clocks and core counts where the maker publishes none (said so).
Peaks are ceilings; a runtime reaches some share of them, which is what chapter 10 measures.
`this_machine` measures the machine it runs on instead, and two ceilings a datasheet leaves
out: the read bandwidth of each cache level (a model whose weights fit in cache is read from
there, faster than from memory: the *cache-aware* roofline) and the rate a CPU does the
arithmetic of 4-bit products (unpacking each code, converting, multiplying: on a CPU that work,
not the reading of half a byte a weight, can be the limit).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .env import best_seconds, matmul_gflops
from .kernels import cpu_kernels, int4_linear
from .models.budget import kv_cache_bytes_per_token, param_count
from .models.config import ModelConfig

__all__ = [
    "DEVICES",
    "WEIGHT_BITS",
    "Device",
    "Roofline",
    "bandwidths_by_size",
    "fixed_cost_and_share",
    "int4_product_rates",
    "last_level_cache_bytes",
    "read_bandwidth_gbs",
    "roofline",
    "this_machine",
]

# Bits a weight takes in each storage format, scales included: GGUF's Q8_0 and Q4_0 keep one
# fp16 scale per 32 weights (8.5 and 4.5 bits), Q4_1 a scale and a minimum (5 bits), Q4_K
# 144 bytes per 256 weights (4.5); slmlab's int4 with groups of 32 and an fp16 scale is Q4_0's
# size.
WEIGHT_BITS = {
    "fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "q8_0": 8.5,
    "int4": 4.5, "q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.5,
}  # fmt: skip
_KV_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8}
# Formats whose matrix-vector products unpack 4-bit codes (and Q4_K's 6-bit scales) first.
_FOUR_BIT = frozenset({"int4", "q4_0", "q4_1", "q4_k"})
# How much faster than memory a level must read for a step's bytes to count as read from cache:
# the largest buffers measured (128 MiB) read at about memory's rate and may come out a
# little above it.
CACHE_OVER_MEMORY = 1.5


@dataclass(frozen=True)
class Device:
    """A device's memory and peaks. Compute in tera-operations/s (None: not published or not
    there), bandwidth in GB/s (10⁹ bytes), memory in GB.

    `cache_bandwidths` lists (MiB, GB/s): the read bandwidth for data of at most that many MiB,
    smallest first, where measured. `int4_rates` lists (inputs, billions of weights/s): how
    fast a 4-bit matrix-vector product gets through a weight whose rows are that long with its
    codes already in cache (its arithmetic alone: a short row is a short chain of sums and
    pays its start and end more often), where measured. The catalogue's devices publish
    neither."""

    name: str
    memory_gb: float
    bandwidth_gbs: float
    fp32_tflops: float
    fp16_tflops: float | None
    int8_tops: float | None
    source: str
    cache_bandwidths: tuple[tuple[float, float], ...] = ()
    int4_rates: tuple[tuple[int, float], ...] = ()

    def bandwidth_for(self, nbytes: float) -> float:
        """GB/s for reading `nbytes` over and over: the first cache level listed that holds
        them, main memory otherwise (and never below main memory's)."""
        for mib, gbs in self.cache_bandwidths:
            if nbytes <= mib * 2**20:
                return max(gbs, self.bandwidth_gbs)
        return self.bandwidth_gbs

    def int4_rate(self, in_features: int) -> float | None:
        """Billions of weights/s of a 4-bit product with rows of `in_features`: between two
        measured widths, interpolated on a log scale; outside them, the nearest; None where
        not measured."""
        if not self.int4_rates:
            return None
        widths = [math.log2(w) for w, _ in self.int4_rates]
        rates = [r for _, r in self.int4_rates]
        x = min(max(math.log2(in_features), widths[0]), widths[-1])
        for i in range(1, len(widths)):
            if x <= widths[i]:
                t = (x - widths[i - 1]) / (widths[i] - widths[i - 1])
                return rates[i - 1] + t * (rates[i] - rates[i - 1])
        return rates[-1]

    def peak(self, weights: str) -> float:
        """Operations/s the matrix products of `weights` can run at: int8 units for 8- and
        4-bit weights (llama.cpp's CPU path quantizes activations to 8 bits too), half
        precision for fp16/bf16, fp32 otherwise; the best the device has that applies."""
        if weights not in WEIGHT_BITS:
            raise ValueError(f"weights {weights!r}: choose one of {list(WEIGHT_BITS)}")
        if WEIGHT_BITS[weights] <= 8.5 and self.int8_tops:
            return self.int8_tops * 1e12
        if WEIGHT_BITS[weights] <= 16 and self.fp16_tflops:
            return self.fp16_tflops * 1e12
        return self.fp32_tflops * 1e12


DEVICES: dict[str, Device] = {
    "raspberry-pi-5": Device(
        "Raspberry Pi 5 (8 GB)", 8, 17.1, 0.154, 0.307, 0.614,
        "Raspberry Pi 5 product brief (4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267 on a 32-bit bus: "
        "17.1 GB/s); compute computed from Arm's Cortex-A76 optimization guide: two 128-bit "
        "NEON FMA pipes (16 fp32, 32 fp16 FLOP/cycle/core), SDOT for int8 (64 op/cycle/core)",
    ),
    "iphone-15-pro": Device(
        "iPhone 15 Pro (A17 Pro)", 8, 51.2, 2.1, 4.3, 35.0,
        "Apple's A17 Pro announcement (Sept 2023): 16-core Neural Engine, 35 trillion "
        "operations/s; LPDDR5-6400 on a 64-bit bus (51.2 GB/s); GPU figures computed from its "
        "6 cores x 128 ALUs at ~1.4 GHz",
    ),
    "jetson-orin-nano-super": Device(
        "NVIDIA Jetson Orin Nano Super (8 GB)", 8, 102.0, 2.1, 17.0, 33.0,
        "NVIDIA Jetson Orin Nano Super Developer Kit specifications (Dec 2024): 8 GB LPDDR5 at "
        "102 GB/s, 67 INT8 TOPS with 2:4 sparsity (33 dense); fp16 tensor and fp32 CUDA-core "
        "figures computed from 1024 CUDA cores and 32 tensor cores at 1.02 GHz",
    ),
    "macbook-air-m3": Device(
        "MacBook Air M3 (16 GB)", 16, 100.0, 3.6, 3.6, 18.0,
        "Apple M3 announcement (Oct 2023) and MacBook Air tech specs: 100 GB/s unified memory, "
        "18 TOPS Neural Engine; GPU fp32 computed from 10 cores x 128 ALUs at ~1.4 GHz",
    ),
    "x86-laptop": Device(
        "x86 laptop (4 cores AVX2, DDR4-3200 x2)", 16, 51.2, 0.384, None, 0.768,
        "computed: two DDR4-3200 channels (2 x 25.6 GB/s); 4 cores at 3 GHz with two 256-bit "
        "FMA units (32 fp32 FLOP/cycle/core), AVX-VNNI-less int8 via vpmaddubsw (2x fp32)",
    ),
    "h100-sxm": Device(
        "NVIDIA H100 SXM", 80, 3350.0, 67.0, 989.5, 1979.0,
        "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3 at 3.35 TB/s; FP32 67 TFLOPS, "
        "BF16/FP16 989.5 TFLOPS and INT8 1979 TOPS dense (half the sparse figures)",
    ),
    "h200-sxm": Device(
        "NVIDIA H200 SXM", 141, 4800.0, 67.0, 989.5, 1979.0,
        "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e at 4.8 TB/s; compute as H100 SXM",
    ),
}  # fmt: skip


def read_bandwidth_gbs(megabytes: float = 512, repeats: int = 5) -> float:
    """Read bandwidth: the best of a few sums over a buffer of `megabytes` MiB (on every
    thread PyTorch uses, as a decode step reads its weights). The default is far larger than
    any cache: main memory's."""
    x = torch.ones(int(megabytes * 2**20) // 4, dtype=torch.float32)
    x.sum()
    return x.numel() * 4 / best_seconds(x.sum, repeats=repeats) / 1e9


def bandwidths_by_size(
    sizes_mib: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128),
) -> tuple[tuple[float, float], ...]:
    """(MiB, GB/s) for buffers of each size, read over and over as decode steps read a model's
    weights: where a buffer fits in a cache level, that level's bandwidth. Measured, since a
    virtual machine's reported cache sizes need not be what its programs get."""
    return tuple((mib, round(read_bandwidth_gbs(mib, repeats=20), 1)) for mib in sizes_mib)


def int4_product_rates(
    widths: tuple[int, ...] = (256, 512, 1024, 2048, 4096), seconds: float = 0.05
) -> tuple[tuple[int, float], ...]:
    """(inputs, billions of weights/s) of slmlab's 4-bit matrix-vector product (groups of 32,
    as Q4_0) on this CPU, for weights of about a million weights (a small model's matrix:
    2**20 / inputs rows) whose codes, half a MiB, stay in cache so that reading them is not
    what is timed; empty without the compiled kernels."""
    if cpu_kernels() is None:
        return ()
    generator = torch.Generator().manual_seed(0)
    rates = []
    for width in widths:
        rows = 2**20 // width
        codes = torch.randint(0, 256, (rows, width // 2), dtype=torch.uint8, generator=generator)
        scales = torch.rand(rows, width // 32, generator=generator)
        x = torch.randn(1, width, generator=generator)
        with torch.no_grad():
            int4_linear(x, codes, scales, None, 32)
            best = best_seconds(partial(int4_linear, x, codes, scales, None, 32), seconds=seconds)
        rates.append((width, round(rows * width / best / 1e9, 1)))
    return tuple(rates)


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The largest CPU cache's size (Linux sysfs); `default` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=default)


def fixed_cost_and_share(
    small: tuple[float, float, int], large: tuple[float, float, int] | None = None
) -> tuple[float, float]:
    """A runtime's fixed cost a token for each block it runs (seconds; times a model's blocks,
    `roofline`'s `overhead_s`) and its share of the ceiling (`roofline`'s `share`), from its
    (roofline's seconds a token, measured seconds a token, blocks run a token) on two models:
    the line ``measured = roofline / share + blocks * fixed`` through both. The fixed cost is
    counted by blocks because most of it is theirs: each dispatches its operations, norms,
    activations and attention, whatever its width. `small`'s weights should take next to
    nothing to read, so that its time is the fixed cost; `large`'s should be read from memory,
    so that its time is mostly reading. Without `large`, or where it does not take longer a
    block than `small` (both its time and its ceiling), the share is 1; a fixed cost below 0
    is 0.

    A prompt's pass is the same line (`roofline`'s `prefill_overhead_s` and `prefill_share`),
    from each model's compute ceiling and measured time for the pass: there neither model's
    time is mostly one part, but two models of different widths still fix the line, the wider
    one's products being the larger part of its time."""
    (c0, t0, n0), share = small, 1.0
    if large is not None:
        c1, t1, n1 = large
        reading, slower = c1 * n0 - c0 * n1, t1 * n0 - t0 * n1  # each per block, times n0 n1
        if reading > 0 and slower > 0:
            share = reading / slower
    return max(0.0, (t0 - c0 / share) / n0), share


def this_machine(name: str = "this machine (measured)") -> Device:
    """This machine's CPU as a `Device`, measured now (under a second): memory bandwidth and
    each cache level's (`bandwidths_by_size`), fp32 matmul throughput, and the 4-bit product's
    rates (`int4_product_rates`); int8 and fp16 peaks left out (PyTorch's CPU path does not use
    them for these models)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = 0
    # the best of three windows: a ceiling, and a shared machine's neighbours come and go
    flops = max(matmul_gflops(torch.float32, n=1024, seconds=0.1) for _ in range(3)) / 1e3
    return Device(
        name,
        round(pages / 1e9, 1),
        round(read_bandwidth_gbs(), 1),
        round(flops, 3),
        None,
        None,
        f"measured: {torch.get_num_threads()} threads, sums over 1-512 MiB, 1024x1024 fp32 "
        "matmul, slmlab's int4 product on weights of 2**20 with rows of 256-4096",
        cache_bandwidths=bandwidths_by_size(),
        int4_rates=int4_product_rates(),
    )


@dataclass(frozen=True)
class Roofline:
    """What the roofline says a device does with a model: memory needed and the speed limits
    (tokens/s), with the bound ('memory' or 'compute') that sets each."""

    memory_bytes: float  # weights + KV cache at the context
    weight_bytes: float
    kv_bytes: float
    decode_tokens_per_s: float
    # 'memory', 'compute', 'unpacking' (the 4-bit product's arithmetic), or 'overhead' (the
    # runtime's fixed cost a token, where given and longer than the others)
    decode_bound: str
    decode_bandwidth_gbs: float  # the bandwidth of the level a step's bytes are read from
    decode_from_cache: bool  # that level reads CACHE_OVER_MEMORY x faster than memory or more
    prefill_tokens_per_s: float
    prefill_bound: str  # 'memory', 'compute', or 'overhead' (the pass's, where given and longer)
    fits: bool  # within the device's memory


def roofline(
    config: ModelConfig,
    device: Device,
    *,
    weights: str = "fp32",
    kv: str = "fp32",
    context: int = 512,
    prompt: int = 512,
    bits: float | None = None,
    overhead_s: float = 0.0,
    share: float = 1.0,
    prefill_overhead_s: float = 0.0,
    prefill_share: float = 1.0,
) -> Roofline:
    """The roofline of `config` on `device` with weights stored as `weights` (`WEIGHT_BITS`)
    and the cache as `kv` (fp32, fp16, bf16, int8): decoding one token at `context` tokens of
    cache, and a `prompt` of that many tokens in one pass; batch 1. `bits` replaces the
    format's bits a weight where a file says otherwise (a format's fallback blocks, a table
    kept in fp32 beside int8 products: its bytes over its weights).

    Every matrix is read once a step (the head too: a tied head reads the embedding); the
    embedding's own lookup reads one row. The norms are in the bytes, negligibly. A step's
    bytes are read at the bandwidth of the smallest cache level that holds them
    (`Device.bandwidth_for`); a 4-bit format's step takes at least each matrix's weights over
    the device's 4-bit rate for rows as long as its inputs (`Device.int4_rate`), where
    measured (the bound is then called 'unpacking'): the output projection's rows are
    q_size long, the MLP's down projection's intermediate_size, every other matrix's
    hidden_size.

    `overhead_s` is a runtime's fixed cost a decoded token, which no ceiling of the device's
    holds: dispatching its operations, the norms and activations, attention at a short
    context, sampling. It is added to the bound's time (the bound is called 'overhead' where it
    is the longer of the two); measure it on a model too small for its weights to matter
    (chapter 10 does, on 3M parameters, as a cost a block: `fixed_cost_and_share`).

    `share` is the part of its decoding ceiling a runtime reaches: its matrix-vector products
    stream weights slower than a plain sum reads them (or unpack codes slower than slmlab's
    kernel), by its layouts, threads and prefetching. The bound's time is divided by it, the
    fixed cost is not; measure it on a model whose weights are read from memory (chapter 10
    does, on 76M parameters) and carry it to the next model (`fixed_cost_and_share` finds
    both from a runtime's times on two models).

    `prefill_overhead_s` and `prefill_share` are the same for a prompt's pass: its time
    beyond the products' at the compute ceiling (the norms, activations and attention's
    softmax over the prompt's positions, each block's dispatch; it grows with the prompt, so
    measure it at the prompt's length) and the share of the compute ceiling its products
    reach (below 1 where they are too small to keep the cores busy; above 1 where 8- or 4-bit
    products run integer arithmetic faster than the fp32 ceiling of a device whose int8 peak
    is not known). Chapter 10 measures both as decode's, on the same two models."""
    if weights not in WEIGHT_BITS:
        raise ValueError(f"weights {weights!r}: choose one of {list(WEIGHT_BITS)}")
    if kv not in _KV_BITS:
        raise ValueError(f"kv {kv!r}: choose one of {list(_KV_BITS)}")
    if context < 0 or prompt < 1:
        raise ValueError("context must be >= 0 and prompt >= 1")
    if bits is not None and not bits > 0:
        raise ValueError(f"bits {bits}: a weight takes a positive number of bits")
    for name, value in (("overhead_s", overhead_s), ("prefill_overhead_s", prefill_overhead_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} {value}: a time of 0 s or more")
    for name, value in (("share", share), ("prefill_share", prefill_share)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} {value}: a positive part of the ceiling (1: all of it)")
    counts = param_count(config)
    head = config.vocab_size * config.hidden_size  # the head's matrix, tied or not
    mlp = counts.mlp - counts.idle  # a token reads and runs only the experts routed to it
    read = counts.attention + mlp + counts.norms + head
    bits = WEIGHT_BITS[weights] if bits is None else bits
    weight_bytes = read * bits / 8
    stored = counts.total * bits / 8
    per_token_kv = kv_cache_bytes_per_token(config, "fp32") * _KV_BITS[kv] / 32
    peak = device.peak(weights)
    matmul = 2 * (counts.attention + mlp + head)

    def attention_flops(ctx: float) -> float:
        return 4 * config.num_hidden_layers * config.q_size * ctx

    decode_bytes = weight_bytes + per_token_kv * context
    decode_bandwidth = device.bandwidth_for(decode_bytes)
    bounds = {
        "memory": decode_bytes / (decode_bandwidth * 1e9),
        "compute": (matmul + attention_flops(context)) / peak,
    }
    if weights in _FOUR_BIT and device.int4_rates:
        attention_layers = config.num_hidden_layers - sum(config.linear_layers)
        out_proj = attention_layers * config.q_size * config.hidden_size
        down = mlp // 3  # gate, up and down projections hold a third of the MLP's weights each
        down_width = config.expert_size if config.num_experts else config.intermediate_size
        by_width = [
            (config.hidden_size, matmul / 2 - out_proj - down),
            (config.q_size, out_proj),
            (down_width, down),
        ]
        bounds["unpacking"] = sum(n / (device.int4_rate(w) * 1e9) for w, n in by_width if n > 0)
    decode_bound = max(bounds, key=bounds.__getitem__)
    bound_seconds = bounds[decode_bound] / share
    decode_seconds = bound_seconds + overhead_s
    if overhead_s > bound_seconds:
        decode_bound = "overhead"
    prefill_bytes = weight_bytes + per_token_kv * prompt
    prefill_memory = prefill_bytes / (device.bandwidth_for(prefill_bytes) * 1e9)
    prefill_compute = prompt * (matmul + attention_flops(prompt / 2)) / peak
    prefill_bound = "memory" if prefill_memory >= prefill_compute else "compute"
    prefill_bound_seconds = max(prefill_memory, prefill_compute) / prefill_share
    if prefill_overhead_s > prefill_bound_seconds:
        prefill_bound = "overhead"
    kv_bytes = per_token_kv * max(context, prompt)
    return Roofline(
        memory_bytes=stored + kv_bytes,
        weight_bytes=stored,
        kv_bytes=kv_bytes,
        decode_tokens_per_s=1 / decode_seconds,
        decode_bound=decode_bound,
        decode_bandwidth_gbs=decode_bandwidth,
        decode_from_cache=decode_bandwidth >= CACHE_OVER_MEMORY * device.bandwidth_gbs,
        prefill_tokens_per_s=prompt / (prefill_bound_seconds + prefill_overhead_s),
        prefill_bound=prefill_bound,
        fits=stored + kv_bytes <= device.memory_gb * 1e9,
    )
