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
`this_machine` measures the machine it runs on instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .env import matmul_gflops
from .models.budget import kv_cache_bytes_per_token, param_count
from .models.config import ModelConfig

__all__ = [
    "DEVICES",
    "WEIGHT_BITS",
    "Device",
    "Roofline",
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


@dataclass(frozen=True)
class Device:
    """A device's memory and peaks. Compute in tera-operations/s (None: not published or not
    there), bandwidth in GB/s (10⁹ bytes), memory in GB."""

    name: str
    memory_gb: float
    bandwidth_gbs: float
    fp32_tflops: float
    fp16_tflops: float | None
    int8_tops: float | None
    source: str

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


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Main-memory read bandwidth: the best of a few sums over a buffer far larger than cache
    (on every thread PyTorch uses, as a decode step reads its weights)."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The largest CPU cache's size (Linux sysfs); `default` where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=default)


def this_machine(name: str = "this machine (measured)") -> Device:
    """This machine's CPU as a `Device`: memory bandwidth and fp32 matmul throughput measured
    now (a few tenths of a second), int8 and fp16 left out (PyTorch's CPU path does not use
    them for these models)."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = 0
    flops = matmul_gflops(torch.float32, n=1024, seconds=0.3) / 1e3
    return Device(
        name,
        round(pages / 1e9, 1),
        round(read_bandwidth_gbs(), 1),
        round(flops, 3),
        None,
        None,
        f"measured: {torch.get_num_threads()} threads, 512 MiB sum, 1024x1024 fp32 matmul",
    )


@dataclass(frozen=True)
class Roofline:
    """What the roofline says a device does with a model: memory needed and the speed limits
    (tokens/s), with the bound ('memory' or 'compute') that sets each."""

    memory_bytes: float  # weights + KV cache at the context
    weight_bytes: float
    kv_bytes: float
    decode_tokens_per_s: float
    decode_bound: str
    prefill_tokens_per_s: float
    prefill_bound: str
    fits: bool  # within the device's memory


def roofline(
    config: ModelConfig,
    device: Device,
    *,
    weights: str = "fp32",
    kv: str = "fp32",
    context: int = 512,
    prompt: int = 512,
) -> Roofline:
    """The roofline of `config` on `device` with weights stored as `weights` (`WEIGHT_BITS`)
    and the cache as `kv` (fp32, fp16, bf16, int8): decoding one token at `context` tokens of
    cache, and a `prompt` of that many tokens in one pass; batch 1.

    Every matrix is read once a step (the head too: a tied head reads the embedding); the
    embedding's own lookup reads one row. The norms are in the bytes, negligibly."""
    if weights not in WEIGHT_BITS:
        raise ValueError(f"weights {weights!r}: choose one of {list(WEIGHT_BITS)}")
    if kv not in _KV_BITS:
        raise ValueError(f"kv {kv!r}: choose one of {list(_KV_BITS)}")
    if context < 0 or prompt < 1:
        raise ValueError("context must be >= 0 and prompt >= 1")
    counts = param_count(config)
    head = config.vocab_size * config.hidden_size  # the head's matrix, tied or not
    mlp = counts.mlp - counts.idle  # a token reads and runs only the experts routed to it
    read = counts.attention + mlp + counts.norms + head
    weight_bytes = read * WEIGHT_BITS[weights] / 8
    stored = counts.total * WEIGHT_BITS[weights] / 8
    per_token_kv = kv_cache_bytes_per_token(config, "fp32") * _KV_BITS[kv] / 32
    peak, bandwidth = device.peak(weights), device.bandwidth_gbs * 1e9
    matmul = 2 * (counts.attention + mlp + head)

    def attention_flops(ctx: float) -> float:
        return 4 * config.num_hidden_layers * config.q_size * ctx

    decode_memory = (weight_bytes + per_token_kv * context) / bandwidth
    decode_compute = (matmul + attention_flops(context)) / peak
    prefill_memory = (weight_bytes + per_token_kv * prompt) / bandwidth
    prefill_compute = prompt * (matmul + attention_flops(prompt / 2)) / peak
    kv_bytes = per_token_kv * max(context, prompt)
    return Roofline(
        memory_bytes=stored + kv_bytes,
        weight_bytes=stored,
        kv_bytes=kv_bytes,
        decode_tokens_per_s=1 / max(decode_memory, decode_compute),
        decode_bound="memory" if decode_memory >= decode_compute else "compute",
        prefill_tokens_per_s=prompt / max(prefill_memory, prefill_compute),
        prefill_bound="memory" if prefill_memory >= prefill_compute else "compute",
        fits=stored + kv_bytes <= device.memory_gb * 1e9,
    )
