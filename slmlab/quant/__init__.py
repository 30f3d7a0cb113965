"""Quantization (chapter 08): number formats, algorithms, packed storage and kernels.

* `formats`: integers with scales (2–8 bits, symmetric or not, per tensor, channel or group),
  the NF4 and FP4 codebooks, FP8, int4 packing.
* `linear`: `quantize_(model, QuantConfig(...))`, the one verb; `QuantLinear`, whose int4
  weights multiply through the compiled kernel (`slmlab.kernels.int4_linear`).
* `gptq`, `smoothing` (AWQ, SmoothQuant), `calibrate`: the methods that look at data.
* `Int8KVCache` (``generate(..., kv_cache_dtype=torch.int8)``), which lives in `slmlab.infer`.
* Quantized models save and load with `slmlab.save`/`slmlab.load` (safetensors, with a
  ``quantization_config`` section in config.json).
"""

from ..infer.kv_cache import Int8KVCache  # chapter 08 teaches it; it is a cache of infer's
from ..layers.formats import (
    FORMATS,
    QuantizedTensor,
    codebook,
    dequantize,
    pack_int4,
    quantize,
    unpack_int4,
)
from ..layers.quantized import QuantEmbedding, QuantLinear
from .calibrate import calibration_tokens
from .gptq import gptq_quantize
from .linear import METHODS, QuantConfig, quantize_

__all__ = [
    "FORMATS",
    "METHODS",
    "Int8KVCache",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "QuantizedTensor",
    "calibration_tokens",
    "codebook",
    "dequantize",
    "gptq_quantize",
    "pack_int4",
    "quantize",
    "quantize_",
    "unpack_int4",
]
