"""`quantize_(model, config)`: swap a model's linear layers for weight-quantized ones, in place.

The verb works on any ``nn.Module`` (torchao's style): every ``nn.Linear`` whose name is not
skipped becomes a `QuantLinear` that stores its weight as packed codes and scales, and whose
forward dequantizes and multiplies (the reference path every kernel is checked against).
By default the embedding and the output head stay in full precision, as in most published
4-bit models: they are a large share of a small model's error for a small share of its time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .formats import FORMATS, QuantizedTensor, dequantize, pack_int4, quantize, unpack_int4

__all__ = ["QuantConfig", "QuantLinear", "quantize_"]


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_` does: the format, bits and granularity of round-to-nearest."""

    fmt: str = "int"
    bits: int = 4
    group_size: int | None = 128  # None or -1: one scale per output channel
    symmetric: bool = True
    skip: Sequence[str] = ("lm_head",)  # module names (suffixes) left in full precision

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; choose from {', '.join(FORMATS)}")


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight: 4-bit codes are packed two to a byte."""

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt, self.bits, self.group_size = q.fmt, q.bits, q.group_size
        self.out_features, self.in_features = q.shape
        packed = self.bits == 4
        self.register_buffer("codes", pack_int4(q.codes) if packed else q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def quantized(self) -> QuantizedTensor:
        codes = unpack_int4(self.codes) if self.bits == 4 else self.codes
        return QuantizedTensor(codes, self.scales, self.zeros, self.fmt, self.bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt}, bits={self.bits}, group_size={self.group_size}"
        )


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (except `config.skip`) by a `QuantLinear`."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name.endswith(s) for s in config.skip)
    ]
    if not targets:
        raise ValueError("quantize_ found no nn.Linear layers to quantize (all skipped?)")
    for name, module in targets:
        q = quantize(
            module.weight,
            config.fmt,
            config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear(q, module.bias))
    return model
