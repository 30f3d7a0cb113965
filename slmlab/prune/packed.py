"""`pack_2to4_(model)`: store the 2:4-sparse linear layers of a pruned model packed.

`prune_` with ``pattern="2:4"`` leaves zeros in ordinary layers: the same bytes, the same time.
Packed (`slmlab.layers.Sparse24Linear`: the kept half of the values and 2-bit positions), each
such layer reads 2.125 bytes a weight instead of 4, and batch-1 decoding, which reads every
weight once per token, gets faster by about that much (`benchmarks/prune_speed.py`).

On an NVIDIA GPU of compute capability 8.0 or newer, `to_semi_structured_(model)` gives the same
layers PyTorch's own packed form instead (`torch.sparse.to_sparse_semi_structured`: the kept
half and the hardware's metadata), which the GPU's sparse tensor cores multiply
(`benchmarks/prune_speed_cuda.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers.sparse import Sparse24Linear, is_2to4
from ..models.swap import KEEP, linear_layers, swap_linears

__all__ = ["pack_2to4_", "to_semi_structured_"]

# The sparse operand's shape that PyTorch's 16-bit semi-structured kernels take (CUTLASS's,
# the stricter of its two back ends): rows a multiple of 32, columns a multiple of 64.
SEMI_STRUCTURED_MULTIPLES = (32, 64)


def pack_2to4_(model: nn.Module, *, skip: Sequence[str] = KEEP) -> nn.Module:
    """Swap every ``nn.Linear`` whose weight is 2:4 sparse (and whose name ends in none of
    `skip`) for its packed form, in place, and return the model. The logits stay the same up
    to fp32 summation order."""

    def build(name: str, layer: nn.Linear) -> nn.Module | None:
        return Sparse24Linear.from_linear(layer) if is_2to4(layer.weight) else None

    if not swap_linears(model, build, "all", skip=skip):
        raise ValueError(
            "pack_2to4_: no linear layer is 2:4 sparse; prune the model first with "
            "prune_(model, PruneConfig(method, pattern='2:4'))"
        )
    return model


def to_semi_structured_(model: nn.Module, *, skip: Sequence[str] = KEEP) -> nn.Module:
    """Give every 2:4-sparse ``nn.Linear`` (whose name ends in none of `skip`) PyTorch's
    semi-structured sparse weight, in place, and return the model: on a CUDA GPU of compute
    capability 8.0 or newer, in fp16 or bf16 (``model.cuda().half()`` first). The weight
    takes no gradient: this is for inference; train with `pack_2to4_`'s layers instead."""
    from torch.sparse import to_sparse_semi_structured

    found = [(n, m) for n, m in linear_layers(model, "all", skip=skip) if is_2to4(m.weight)]
    if not found:
        raise ValueError(
            "to_semi_structured_: no linear layer is 2:4 sparse; prune the model first with "
            "prune_(model, PruneConfig(method, pattern='2:4'))"
        )
    rows_multiple, columns_multiple = SEMI_STRUCTURED_MULTIPLES
    for name, layer in found:
        weight = layer.weight
        if weight.device.type != "cuda":
            raise ValueError(
                f"to_semi_structured_: {name}.weight is on {weight.device}; semi-structured "
                "sparse tensors run on CUDA GPUs (compute capability 8.0 or newer): move the "
                "model there first, or on a CPU use pack_2to4_"
            )
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"to_semi_structured_: {name}.weight is {weight.dtype}; the sparse tensor cores "
                "take fp16 or bf16: model.half() or model.bfloat16() first"
            )
        rows, columns = weight.shape
        if rows % rows_multiple or columns % columns_multiple:
            raise ValueError(
                f"to_semi_structured_: {name}.weight is {rows}x{columns}; a semi-structured "
                f"weight needs rows a multiple of {rows_multiple} and columns a multiple of "
                f"{columns_multiple}: add {name.rpartition('.')[2]!r} to skip"
            )
    for _, layer in found:
        sparse = to_sparse_semi_structured(layer.weight.detach())
        layer.weight = nn.Parameter(sparse, requires_grad=False)
    return model
