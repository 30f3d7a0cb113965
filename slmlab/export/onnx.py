"""ONNX out: the decoder with its KV cache as inputs and outputs, for ONNX Runtime.

An ONNX graph is a pure function, so the cache cannot live inside it as `KVCache` lives inside
slmlab: each call takes the keys and values so far (``past_key_values.{i}.key``/``.value``, of
shape (batch, kv heads, past, head dim)) and returns them grown by the new tokens
(``present.{i}.key``/``.value``). The names and the inputs (``input_ids``, ``attention_mask``
over past and new tokens, ``position_ids``) are the ones Hugging Face's Optimum writes, so
ONNX Runtime's web build and transformers.js can drive the file as they drive theirs.

`to_onnx` traces `DecoderLM`'s own blocks (`slmlab.export.common.DecoderWithPast`) with
PyTorch's exporter (``torch.onnx.export``, ``dynamo=True``). `quant="int8"` then applies ONNX Runtime's dynamic quantization
(int8 weights, activations quantized per call) to the matrix products. A tied head stays
fp32: its product reads the embedding's table transposed, a computed input the quantizer
leaves alone. Folding it first (ONNX Runtime's ``quant_pre_process``) quantizes it too, but
saved no time (SmolLM2-135M decoded at 56 tokens/s either way, 2 cores of an AMD EPYC) and
made the file a tenth larger, the fp32 table kept for the lookup. `OnnxDecoder` runs a
file with ONNX Runtime: logits for a prompt, and greedy decoding through the cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_path
from ..kernels import disabled as kernels_disabled
from ..models.decoder import DecoderLM
from .common import DecoderWithPast, ExportError, RuntimeDecoder, exportable

__all__ = ["ONNX_QUANTS", "OnnxDecoder", "to_onnx"]

ONNX_QUANTS = ("fp32", "int8")
OPSET = 18


def to_onnx(
    source: str | os.PathLike | DecoderLM,
    out: str | os.PathLike,
    *,
    quant: str = "fp32",
) -> Path:
    """Write checkpoint `source` (a directory, a GGUF file or a model) as the ONNX file `out`:
    the decoder with KV-cache inputs and outputs, batch, sequence and past lengths dynamic.
    `quant` "int8" quantizes the matrix products' weights with ONNX Runtime's own dynamic
    quantization. The file appears whole or not at all. Returns `out`."""
    if quant not in ONNX_QUANTS:
        raise ExportError(f"quant {quant!r} is not an ONNX export slmlab writes: {ONNX_QUANTS}")
    model = exportable(source, "ONNX").model
    traced = DecoderWithPast(model).eval()
    inputs, outputs = traced.names()
    dims = ("batch", "sequence", "past_sequence", "total_sequence")
    shapes = traced.dynamic_shapes(*(torch.export.Dim(name) for name in dims))
    with atomic_path(out) as tmp, kernels_disabled(), torch.no_grad():
        program = torch.onnx.export(
            traced,
            traced.example_inputs(),
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
        if quant == "fp32":
            program.save(tmp, external_data=False)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory(dir=tmp.parent) as work:
                plain = Path(work) / "fp32.onnx"
                program.save(plain, external_data=False)
                quantize_dynamic(
                    plain, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"]
                )
    return Path(out)


class OnnxDecoder(RuntimeDecoder):
    """An exported decoder run by ONNX Runtime: `logits` of a batch, `generate` greedy tokens.

    `threads` sets ONNX Runtime's intra-op threads (None: its default, one per core)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.layers = len(self._past) // 2

    def _run(
        self, ids: np.ndarray, past: list[np.ndarray], mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        B, T = ids.shape
        P = past[0].shape[2]
        mask = np.ones((B, P + T), np.int64) if mask is None else mask
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, P:]
        feed: dict[str, Any] = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
            "position_ids": positions.astype(np.int64),
        }
        feed.update({i.name: t for i, t in zip(self._past, past, strict=True)})
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """Past keys and values of length 0, the cache before a prompt."""
        return [np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self._past]

    def logits(
        self, input_ids: torch.Tensor | np.ndarray, attention_mask: Any = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) of a batch of token ids, from an empty cache."""
        ids = np.asarray(input_ids)
        mask = None if attention_mask is None else np.asarray(attention_mask)
        logits, _ = self._run(ids, self.empty_cache(ids.shape[0]), mask)
        return torch.from_numpy(logits)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits`, so that the runner scores text as a model does (`slmlab.eval.token_bits`)."""
        return self.logits(input_ids)

    def _step(self, ids: list[int], past: list[np.ndarray]) -> tuple[torch.Tensor, list]:
        logits, present = self._run(np.array([ids]), past)
        return torch.from_numpy(logits[0, -1]), present
