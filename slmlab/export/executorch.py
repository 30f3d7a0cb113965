"""ExecuTorch out: a ``.pte`` program for PyTorch's on-device runtime, its work given to XNNPACK.

ExecuTorch is how PyTorch models ship in Android and iOS apps: ``torch.export`` captures the
graph, the XNNPACK partitioner hands every operator XNNPACK has (matrix products, softmax,
elementwise) to that library of hand-tuned CPU kernels (the same on an Arm phone and this x86
laptop), and what remains runs on ExecuTorch's portable kernels. The program's memory is
planned ahead of time, so every dynamic size has an upper bound: here the context length.

The traced function is `slmlab.export.common.DecoderWithPast`, the ONNX export's (the cache
goes in and comes out), with logits for the last position only, as ExecuTorch's own Llama
export does: a prompt's logits at every position would be planned for the longest prompt. `ExecuTorchDecoder` runs a program with ExecuTorch's Python runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io import atomic_path
from ..kernels import disabled as kernels_disabled
from ..models.decoder import DecoderLM
from .common import DecoderWithPast, ExportError, RuntimeDecoder, exportable

__all__ = ["ExecuTorchDecoder", "to_executorch"]


def to_executorch(
    source: str | os.PathLike | DecoderLM,
    out: str | os.PathLike,
    *,
    context: int | None = None,
) -> Path:
    """Write checkpoint `source` (a directory, a GGUF file or a model) as the ExecuTorch program
    `out` (``.pte``), fp32, delegated to XNNPACK: batch 1, prompt and cache together up to
    `context` tokens (default: the model's context, at most 2048; ExecuTorch plans memory for
    the largest sizes), logits of the last position. The file appears whole or not at all."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise ExportError(
            "ExecuTorch is not installed: pip install 'slmlab[export]' (executorch)"
        ) from None
    model = exportable(source, "ExecuTorch").model
    longest = model.config.max_position_embeddings
    context = min(longest, 2048) if context is None else context
    if not 2 <= context <= longest:
        raise ExportError(f"context {context}: must be in 2..{longest} (max_position_embeddings)")
    traced = DecoderWithPast(model, last_only=True).eval()
    sequence = torch.export.Dim("sequence", min=1, max=context)
    past = torch.export.Dim("past_sequence", min=0, max=context - 1)
    total = torch.export.Dim("total_sequence", min=1, max=context)
    # Sizes 0 and 1 (an empty cache, one new token) are sizes like the others here: without
    # this, tracing specialises them away and the program refuses a one-token step.
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=True)
    with atomic_path(out) as tmp, kernels_disabled(), torch.no_grad(), oblivious:
        program = torch.export.export(
            traced,
            traced.example_inputs(),
            dynamic_shapes=traced.dynamic_shapes(None, sequence, past, total),
        )
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        tmp.write_bytes(lowered.to_executorch().buffer)
    return Path(out)


class ExecuTorchDecoder(RuntimeDecoder):
    """A program `to_executorch` wrote, run by ExecuTorch's runtime: `logits`, greedy `generate`."""

    def __init__(self, path: str | os.PathLike) -> None:
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(Path(path)).load_method("forward")
        meta = self.method.metadata
        self._cache_shapes = [
            tuple(meta.input_tensor_meta(i).sizes()) for i in range(3, meta.num_inputs())
        ]

    def _run(
        self, ids: torch.Tensor, past: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        T, P = ids.shape[1], past[0].shape[2]
        inputs = [ids, torch.ones(1, P + T, dtype=torch.long), torch.arange(P, P + T)[None]]
        logits, *present = self.method.execute([*inputs, *past])
        return logits, present

    def empty_cache(self) -> list[torch.Tensor]:
        return [torch.zeros(1, s[1], 0, s[3]) for s in self._cache_shapes]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (1, 1, vocab) of the last of one row of token ids, from an empty cache."""
        return self._run(torch.as_tensor(input_ids).long(), self.empty_cache())[0]

    def _step(self, ids: list[int], past: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
        logits, present = self._run(torch.tensor([ids]), past)
        return logits[0, -1], present
