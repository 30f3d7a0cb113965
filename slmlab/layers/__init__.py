"""Layers a checkpoint stores beyond the plain decoder's: quantized weights in their number
formats (chapter 08), and LoRA's low-rank updates in PEFT's format (chapter 06). The transforms
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

__all__ = [
    "FORMATS",
    "LoRALinear",
    "LoraConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedTensor",
    "apply_lora_",
    "codebook",
    "dequantize",
    "load_adapter_",
    "merge_lora_",
    "pack_int4",
    "quantize",
    "unpack_int4",
]
