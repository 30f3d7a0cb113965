"""Layers a checkpoint stores beyond the plain decoder's: quantized weights in their number
formats (chapter 08), LoRA's low-rank updates in PEFT's format (chapter 06), and factored and
2:4-sparse weights (chapter 09). The transforms
that make them (`slmlab.quant`, `slmlab.finetune`) sit above."""

from .formats import (
    FORMATS,
    QuantizedTensor,
    codebook,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from .lora import LoraConfig, LoRALinear, apply_lora_, load_adapter_, merge_lora_
from .quantized import QuantEmbedding, QuantLinear
from .sparse import Sparse24Linear, pack_2to4, unpack_2to4

__all__ = [
    "FORMATS",
    "LoRALinear",
    "LoraConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedTensor",
    "Sparse24Linear",
    "apply_lora_",
    "codebook",
    "dequantize",
    "load_adapter_",
    "merge_lora_",
    "pack_2to4",
    "pack_int4",
    "quantize",
    "unpack_2to4",
    "unpack_int4",
]
