"""Export: a checkpoint as the file another runtime runs, one verb per target.

* `to_gguf` — llama.cpp's GGUF (and everything built on it: wllama in the browser, Ollama);
* `to_onnx` — ONNX with the KV cache as inputs and outputs, for ONNX Runtime (and its web build);
* `to_executorch` — an ExecuTorch program (``.pte``) delegated to XNNPACK, for phones.

Each takes a checkpoint directory, a GGUF file or a model in memory, and refuses a layer the
target has no counterpart for (`ExportError` names it).
"""

from .common import ExportError, check_plain
from .executorch import ExecuTorchDecoder, to_executorch
from .gguf import GGUF_TYPES, to_gguf
from .onnx import ONNX_QUANTS, OnnxDecoder, to_onnx

__all__ = [
    "GGUF_TYPES",
    "ONNX_QUANTS",
    "ExecuTorchDecoder",
    "ExportError",
    "OnnxDecoder",
    "check_plain",
    "to_executorch",
    "to_gguf",
    "to_onnx",
]
