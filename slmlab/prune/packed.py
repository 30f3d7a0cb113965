"""`pack_2to4_(model)`: store the 2:4-sparse linear layers of a pruned model packed.

`prune_` with ``pattern="2:4"`` leaves zeros in ordinary layers: the same bytes, the same time.
Packed (`slmlab.layers.Sparse24Linear`: the kept half of the values and 2-bit positions), each
such layer reads 2.125 bytes a weight instead of 4, and batch-1 decoding, which reads every
weight once per token, gets faster by about that much (`benchmarks/prune_speed.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..layers.sparse import Sparse24Linear, is_2to4
from ..models.swap import KEEP, swap_linears

__all__ = ["pack_2to4_"]


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
