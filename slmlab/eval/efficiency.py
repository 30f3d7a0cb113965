"""What a model costs to run: latency, throughput, memory and size, measured, as JSON.

* prefill latency: one forward over a prompt of `prompt_tokens` tokens;
* decode latency: milliseconds per generated token after that prompt (batch 1, greedy,
  with the KV cache), the median of `repeats` runs;
* throughput: generated tokens per second at each batch size (all rows decode together);
* memory: the process's peak resident set (Linux clears its high-water mark first, so the peak
  is this measurement's) and, on CUDA, the allocator's peak; the model's own bytes;
* size on disk: the checkpoint directory's files, when a path is given;
* `continuation_ms`: one call of the model on a few new tokens after a cached context, which
  is what decoding (one token) and a speculative check (a draft and one more) cost.

Timings on a shared machine vary by a tenth or more between runs: compare numbers from one run.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..env import best_seconds

__all__ = [
    "continuation_ms",
    "disk_bytes",
    "measure_efficiency",
    "model_bytes",
    "peak_rss_bytes",
]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of the files of a checkpoint directory (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _reset_peak_rss() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (since the last reset, on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def continuation_ms(
    model: torch.nn.Module, new_tokens: int, *, context: int = 16, repeats: int = 20
) -> float:
    """Milliseconds of one call of `model` on `new_tokens` tokens continuing a KV cache that
    holds `context`: the best of 3 rounds of `repeats` calls (batch 1)."""
    from ..models.decoder import KVCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, context + new_tokens, dtype=dtype, device=device)
    model(torch.arange(1, context + 1, device=device)[None], cache=cache)
    saved = cache.snapshot()
    x = torch.full((1, new_tokens), 5, device=device)

    def round_of_calls() -> None:
        _sync(device)
        for _ in range(repeats):
            cache.restore(saved)  # forget the last call's tokens: the same call again
            model(x, cache=cache)
        _sync(device)

    return best_seconds(round_of_calls, repeats=3) / repeats * 1e3


@torch.no_grad()
def measure_efficiency(
    model: torch.nn.Module,
    *,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    repeats: int = 3,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Latency, throughput and memory of `model` (see the module); a JSON-ready dict."""
    from ..env import report
    from ..infer import generate

    config = model.config
    if prompt_tokens + new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt_tokens + new_tokens ({prompt_tokens + new_tokens}) exceeds the model's "
            f"context ({config.max_position_embeddings})"
        )
    device = next(model.parameters()).device
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(
        0, config.vocab_size, (max(batch_sizes), prompt_tokens), generator=generator
    )
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    one = prompt[:1].to(device)
    generate(model, one, 2, stop_tokens=())  # warm-up (kernels compile, caches fill)
    prefill = timed(lambda: model(one, last_only=True))
    with_decode = timed(lambda: generate(model, one, new_tokens, stop_tokens=()))
    throughput = {}
    for batch in batch_sizes:
        rows = prompt[:batch].to(device)
        seconds = timed(lambda rows=rows: generate(model, rows, new_tokens, stop_tokens=()))
        throughput[str(batch)] = batch * new_tokens / seconds
    result: dict[str, Any] = {
        "settings": {
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "batch_sizes": list(batch_sizes),
            "repeats": repeats,
            "seed": seed,
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": model_bytes(model),
        "prefill_ms": prefill * 1e3,
        # The first new token comes from the prefill; the rest cost one decode step each.
        "decode_ms_per_token": max(with_decode - prefill, 0.0) / max(new_tokens - 1, 1) * 1e3,
        "tokens_per_s": throughput,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_is_this_measurement": reset,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
        "machine": report(),
    }
    if path is not None:
        result["disk_bytes"] = disk_bytes(path)
    return result
