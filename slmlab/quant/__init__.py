"""Quantization (chapter 08): number formats, round-to-nearest, packed storage, `quantize_`.

Started: the formats (int2..8 symmetric/asymmetric per tensor, channel or group; NF4 and FP4
codebooks; FP8), int4 packing, and `quantize_` with round-to-nearest. GPTQ, AWQ, SmoothQuant,
LLM.int8, QAT, ternary weights, quantized checkpoints and the packed int4 kernels come next.
"""

from .formats import (
    FORMATS,
    QuantizedTensor,
    codebook,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from .linear import QuantConfig, QuantLinear, quantize_

__all__ = [
    "FORMATS",
    "QuantConfig",
    "QuantLinear",
    "QuantizedTensor",
    "codebook",
    "dequantize",
    "pack_int4",
    "quantize",
    "quantize_",
    "unpack_int4",
]
