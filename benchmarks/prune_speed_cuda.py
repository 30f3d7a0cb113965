"""2:4-sparse linear layers on a CUDA GPU: PyTorch's semi-structured sparse tensors against the
dense product, in the same run.

    python -m benchmarks.prune_speed_cuda [--size 4096] [--layers 16]
                                          [--batches 1,16,64,256,1024,4096]

Times y = x Wᵀ for square fp16 and bf16 weights pruned to 2:4 by magnitude: cuBLAS on the
dense weight (its zeros multiplied) and the same weight through `slmlab.prune.to_semi_structured_`
(the kept half and the hardware's metadata, multiplied by the sparse tensor cores of compute
capability 8.0 and newer), with the largest difference between the two. Timed as
`benchmarks/quant_speed_cuda.py` times its layers: `--layers` different weights, more bytes than
L2 holds, replayed as one CUDA graph, the median per layer (a path that cannot be captured says
so). The GPU's sparse products pay at many rows, where the product is bound by compute; at one
row both read the weight's bytes, and the sparse one reads a little over half of them.
Writes benchmarks/results/prune_speed_cuda.json.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from benchmarks.common import write
from benchmarks.quant_speed_cuda import copy_bandwidth_gbs, graph_ms_per_layer
from slmlab.prune import nm_mask, to_semi_structured_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batches", default="1,16,64,256,1024,4096")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise SystemExit(
            "this benchmark needs a CUDA GPU of compute capability 8.0 or newer; the CPU one "
            "is benchmarks.prune_speed"
        )
    n, count = args.size, args.layers
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            dense = nn.Sequential(*(nn.Linear(n, n, bias=False) for _ in range(count)))
            for layer in dense:
                nn.init.normal_(layer.weight, std=0.02)
                layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4))
            dense = dense.cuda().to(dtype)
            sparse = to_semi_structured_(copy.deepcopy(dense), skip=())
            paths = {
                f"cuBLAS {name}, zeros multiplied": lambda x, ms=dense: [m(x) for m in ms],
                "semi-structured 2:4": lambda x, ms=sparse: [m(x) for m in ms],
            }
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, n, device="cuda", dtype=dtype)
                error = float((sparse[0](x).float() - dense[0](x).float()).abs().max())
                row: dict[str, object] = {
                    k: graph_ms_per_layer(step, x, count) for k, step in paths.items()
                }
                dense_ms, sparse_ms = row.values()
                if isinstance(dense_ms, float) and isinstance(sparse_ms, float):
                    row["2:4 speed-up"] = round(dense_ms / sparse_ms, 2)
                row["max abs difference"] = round(error, 5)
                key = f"{name} batch {batch}"
                results[key] = row
                print(key + ": " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    path = write(
        "prune_speed_cuda",
        {
            "settings": {"size": n, "layers": count, "pattern": "2:4 by magnitude",
                         "timer": "CUDA graph over all layers, triton do_bench median, per layer"},
            "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1),
            "milliseconds_per_layer": results,
        },
    )  # fmt: skip
    print(path)


if __name__ == "__main__":
    main()
