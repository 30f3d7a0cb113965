"""Layers a checkpoint stores beyond the plain decoder's: quantized weights in their number
formats (chapter 08). The transforms that make them (`slmlab.quant`) sit above."""

from .formats import (
    FORMATS,
    QuantizedTensor,
    codebook,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from .quantized import QuantEmbedding, QuantLinear

__all__ = [
    "FORMATS",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedTensor",
    "codebook",
    "dequantize",
    "pack_int4",
    "quantize",
    "unpack_int4",
]
