"""Weight-only 4-bit linear layers on a CUDA GPU, every path in the same run.

    python -m benchmarks.quant_speed_cuda [--size 4096] [--layers 16]
                                          [--batches 1,4,16,32,64,256,1024,4096] [--sweep]

Times y = x Wᵀ for square weights in fp16 and bf16: cuBLAS on the 16-bit weight
(``F.linear``); slmlab's `QuantLinear` in 4 bits (group 128), which picks between the fused
Triton kernel and dequantize-then-cuBLAS by the number of rows; each of those two forced; the
layer's PyTorch reference path (unpack and dequantize with tensor ops, then ``F.linear``); and
bitsandbytes' ``Linear4bit`` (NF4) where it is installed.

How it is timed, and why: a decoding step is many layers in a row, each read once from HBM, and
a real decoder replays them from a CUDA graph. So each path runs over `--layers` different
weights (more bytes than the L2 cache holds), captured in one CUDA graph, and the time is the
median replay from `triton.testing.do_bench` (which also empties L2 first) divided by the
number of layers. Per-call Python and launch costs, which would otherwise hide a 10 µs kernel,
are left out for every path alike. The device-to-device copy bandwidth is measured in the same
run: a weight's bytes over it is the floor of a batch-1 product.

``--sweep`` also times a grid of the fused kernel's tile sizes at a few batches and lists the
fastest: how `slmlab.kernels.triton_int4.launch_config` and `FUSED_MAX_ROWS` were chosen.
Writes benchmarks/results/quant_speed_cuda.json.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import bitsandbytes_layer, write
from slmlab.quant import QuantConfig, quantize_


def copy_bandwidth_gbs(megabytes: int = 1024) -> float:
    """HBM bandwidth: bytes read plus bytes written by a device-to-device copy, per second."""
    import triton.testing

    a = torch.empty(megabytes * 2**20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e6


def graph_ms_per_layer(step: Callable[[torch.Tensor], object], x: torch.Tensor, layers: int):
    """Milliseconds per layer of `step(x)` (which runs every layer once) replayed as a CUDA
    graph, or the reason it could not be captured."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile and warm up outside the capture
                step(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(x)
    except Exception as error:  # reported in the results: one path, not the run, fails
        torch.cuda.synchronize()
        return f"not capturable: {type(error).__name__}"
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return round(ms / layers, 4)


def layer_paths(layers: list, dense: list, nf4: list | None, group: int, dtype) -> dict:
    """Each timed path as a step that runs x through every layer once."""
    from slmlab.kernels.triton_int4 import dequantize_int4, int4_linear, launch_config

    name = str(dtype).removeprefix("torch.")

    def fused(x: torch.Tensor, m) -> torch.Tensor:
        config = launch_config(x.shape[0], m.out_features, m.in_features, group)
        return int4_linear(x, m.codes, m.scales, m.zeros, group, config)

    def dequantized(x: torch.Tensor, m) -> torch.Tensor:
        return F.linear(x, dequantize_int4(m.codes, m.scales, m.zeros, group, dtype))

    per_layer = {
        f"cuBLAS {name} F.linear": (dense, F.linear),
        "slmlab QuantLinear int4": (layers, lambda x, m: m(x)),
        "  fused Triton kernel": (layers, fused),
        "  Triton dequantize, then cuBLAS": (layers, dequantized),
        "PyTorch reference (tensor ops)": (
            layers,
            lambda x, m: F.linear(x, m.dequantized_weight(dtype)),
        ),
    }
    if nf4 is not None:
        per_layer["bitsandbytes Linear4bit nf4"] = (nf4, lambda x, m: m(x))
    return {
        k: (lambda x, items=items, fn=fn: [fn(x, item) for item in items])
        for k, (items, fn) in per_layer.items()
    }


def sweep(x: torch.Tensor, layers: list, bench) -> list[dict]:
    """The fused kernel over a grid of tile sizes, fastest first (those that compile)."""
    from slmlab.kernels.triton_int4 import LaunchConfig, int4_linear

    if x.shape[0] <= 16:
        grid = itertools.product([16], [32, 64, 128], [64, 128], [1, 2, 4, 8, 16], [2, 4], [2, 4])
    else:
        grid = itertools.product([32, 64, 128], [64, 128, 256], [64, 128], [1, 2], [4, 8], [3, 4])
    timed = []
    for values in grid:
        config = LaunchConfig(*values)

        def step(x, c=config):
            for m in layers:
                int4_linear(x, m.codes, m.scales, m.zeros, m.group_size, c)

        ms = bench(step, x)
        if isinstance(ms, float):
            timed.append({"ms": ms, **config._asdict()})
    return sorted(timed, key=lambda t: t["ms"])[:5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batches", default="1,4,16,32,64,256,1024,4096")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's tile sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; the CPU one is benchmarks.quant_speed")
    n, group, count = args.size, args.group_size, args.layers
    torch.manual_seed(0)
    linears = [torch.nn.Linear(n, n, bias=False) for _ in range(count)]
    for linear in linears:
        torch.nn.init.normal_(linear.weight, std=0.02)
    weights = [linear.weight.detach().cuda() for linear in linears]
    config = QuantConfig(bits=4, group_size=group)
    layers = [quantize_(torch.nn.Sequential(lin), config)[0].cuda() for lin in linears]
    bench = lambda step, x: graph_ms_per_layer(step, x, count)  # noqa: E731
    bandwidth = copy_bandwidth_gbs()
    results: dict[str, dict] = {}
    sweeps: dict[str, list] = {}
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            dense = [m.dequantized_weight(dtype) for m in layers]  # the same numbers, 16-bit
            nf4 = [bitsandbytes_layer(w.to(dtype), "nf4") for w in weights]
            if any(layer is None for layer in nf4):
                nf4 = None  # bitsandbytes is not installed

            paths = layer_paths(layers, dense, nf4, group, dtype)
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, n, device="cuda", dtype=dtype)
                # The 4-bit layer's answer against the 16-bit product of the same weight.
                error = float((layers[0](x).float() - F.linear(x, dense[0]).float()).abs().max())
                row: dict[str, object] = {k: bench(step, x) for k, step in paths.items()}
                dense_ms, int4_ms = row[f"cuBLAS {name} F.linear"], row["slmlab QuantLinear int4"]
                row["int4 speed-up over 16-bit"] = round(dense_ms / int4_ms, 2)
                row["int4 TFLOP/s"] = round(2 * batch * n * n / int4_ms / 1e9, 1)
                row["int4 max abs difference from the 16-bit product"] = round(error, 5)
                key = f"{name} batch {batch}"
                results[key] = row
                print(
                    key + ": " + ", ".join(f"{k.strip()} {v}" for k, v in row.items()), flush=True
                )
                if args.sweep and dtype is torch.float16 and batch in (1, 16, 64):
                    sweeps[f"batch {batch}"] = sweep(x, layers, bench)
                    print(f"  fastest tiles: {sweeps[f'batch {batch}'][:3]}", flush=True)
    int4_bytes = layers[0].codes.numel() + layers[0].scales.numel() * 4
    weight_mb = {"16-bit": n * n * 2 / 1e6, "int4": int4_bytes / 1e6}
    path = write(
        "quant_speed_cuda",
        {
            "settings": {
                "size": n,
                "layers": count,
                "group_size": group,
                "timer": "CUDA graph over all layers, triton do_bench median, per layer",
            },
            "copy_bandwidth_gbs": round(bandwidth, 1),
            "weight_megabytes": weight_mb,
            "roofline_ms_batch1": {k: round(v / bandwidth, 4) for k, v in weight_mb.items()},
            "milliseconds_per_layer": results,
            **({"fastest_tiles": sweeps} if sweeps else {}),
        },
    )
    print(path)


if __name__ == "__main__":
    main()
