"""What every exporter needs: the checkpoint's parts, and the refusal of a model a target cannot run.

An exporter takes a checkpoint (a directory, a GGUF file, or a model already in memory with
its tokenizer) and writes one file another runtime reads. Runtimes know the plain Llama
block: linear layers, RMSNorm, rotary attention, SwiGLU. A layer slmlab swapped in (a LoRA
adapter, a 2:4 packed or low-rank factorised matrix, slmlab's own quantized formats) has no
counterpart there, so the exporter names it and says what to do instead of writing a file
the runtime would misread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load, load_chat_settings, load_tokenizer
from ..kernels import linear
from ..layers.lora import LoRALinear
from ..layers.lowrank import LowRankLinear
from ..layers.quantized import QuantEmbedding, QuantLinear
from ..layers.sparse import Sparse24Linear
from ..models.decoder import (
    Attention,
    DecoderBlock,
    DecoderLM,
    DecoderStack,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
)
from ..models.mlp import SparseMoE

__all__ = [
    "DecoderWithPast",
    "ExportError",
    "Exportable",
    "RuntimeDecoder",
    "check_plain",
    "exportable",
]

_PLAIN = (
    DecoderLM, DecoderStack, DecoderBlock, Attention, SwiGLU, RMSNorm, RotaryEmbedding,
    nn.Linear, nn.Embedding, nn.ModuleList,
)  # fmt: skip

# What to do about each kind of layer a runtime does not have.
_FIXES = {
    LoRALinear: "merge the adapter into its base first (slmlab.layers.lora.merge_lora_)",
    QuantLinear: "export the unquantized checkpoint and let the target quantize (its --quant)",
    QuantEmbedding: "export the unquantized checkpoint and let the target quantize (its --quant)",
    Sparse24Linear: "export the checkpoint before pack_2to4_ (the zeros stay; the format does not)",
    LowRankLinear: "export a checkpoint without factorised layers: the target has no such layer",
    SparseMoE: "the exporters write dense MLPs only; a mixture of experts stays in slmlab",
}


class ExportError(ValueError):
    """A model or an option a target cannot take; the message names the layer or field, the
    format, and what to do."""


@dataclass
class Exportable:
    """A checkpoint's parts, as every exporter reads them."""

    model: DecoderLM
    tokenizer: Any  # tokenizers.Tokenizer
    chat_settings: dict[str, Any]  # chat_template, bos_token, eos_token... (may be empty)
    name: str


def exportable(
    source: str | os.PathLike | DecoderLM,
    fmt: str,
    *,
    tokenizer: Any = None,
    chat_settings: dict[str, Any] | None = None,
) -> Exportable:
    """The parts of `source`: a checkpoint directory or GGUF file (read from disk), or a model in
    memory (then `tokenizer` is needed for the formats that carry one). Refuses, naming the
    layer, a model with a layer the `fmt` target does not have."""
    if isinstance(source, DecoderLM):
        model, name = source, "slmlab"
    else:
        path = Path(source)
        model = load(path)
        tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
        chat_settings = load_chat_settings(path) if chat_settings is None else chat_settings
        name = path.stem if path.suffix == ".gguf" else path.resolve().name
        if name in ("last", "best") or name.startswith("step-"):  # a run's checkpoint
            name = path.resolve().parent.name
    check_plain(model, fmt)
    return Exportable(model.eval(), tokenizer, dict(chat_settings or {}), name)


def check_plain(model: nn.Module, fmt: str) -> None:
    """Refuse a model whose layers are not the plain Llama block's, naming the first such layer,
    or whose attention is not over every earlier token (a sliding window)."""
    config = getattr(model, "config", None)
    if getattr(config, "block_repeats", 1) > 1:
        raise ExportError(
            f"config.block_repeats is {config.block_repeats}: the {fmt} export runs each block "
            "once; export a model whose blocks do not repeat"
        )
    window = getattr(config, "sliding_window", None)
    if window is not None:
        raise ExportError(
            f"config.sliding_window is {window}: the {fmt} export attends to every earlier "
            "token; export a model without a sliding window"
        )
    for name, module in model.named_modules():
        if not isinstance(module, _PLAIN) or (
            isinstance(module, nn.Linear | nn.Embedding) and type(module) not in _PLAIN
        ):
            fix = next((f for kind, f in _FIXES.items() if isinstance(module, kind)), None)
            raise ExportError(
                f"layer {name!r} is a {type(module).__name__}, which {fmt} has no counterpart "
                f"for; {fix or 'export a model of plain Llama blocks'}"
            )
        if module._forward_hooks or module._forward_pre_hooks:
            raise ExportError(
                f"layer {name!r} has a forward hook, which {fmt} would not run; remove it first"
            )


class _ConcatCache:
    """`KVCache`'s `update`, as a graph can do it: the new keys and values appended to the past
    ones, both kept as the layer's outputs."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.past[layer]
        k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.present.append((k, v))
        return k, v


class DecoderWithPast(nn.Module):
    """`model` as a pure function of (input_ids, attention_mask, position_ids, past...) to
    (logits, present...), what an exporter traces: a graph cannot hold `KVCache`, so each call
    takes the keys and values so far, (batch, kv heads, past, head dim) per layer, and returns
    them grown by the new tokens. `DecoderLM`'s own blocks run; only the cache differs."""

    def __init__(self, model: DecoderLM, *, last_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.last_only = last_only  # logits of the last position alone (all generation needs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        stack = self.model.model
        T = input_ids.shape[1]
        total = attention_mask.shape[1]  # past + new
        cache = _ConcatCache([(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)])
        keys = torch.arange(total, device=input_ids.device)
        queries = (torch.arange(T, device=input_ids.device) + (total - T))[:, None]
        # Causal over past and new tokens, padding hidden; a padding query sees itself (no NaN).
        mask = ((keys <= queries) & attention_mask.bool()[:, None, None, :]) | (keys == queries)
        cos = stack.rotary_emb.cos[position_ids].unsqueeze(1)
        sin = stack.rotary_emb.sin[position_ids].unsqueeze(1)
        x = stack.embed_tokens(input_ids)
        for layer in stack.layers:
            x = layer(x, cos, sin, mask, cache)
        if self.last_only:
            x = x[:, -1:]
        logits = linear(stack.norm(x), self.model.lm_head)
        return (logits, *(t for kv in cache.present for t in kv))

    def example_inputs(
        self, batch: int = 1, sequence: int = 3, past: int = 2
    ) -> tuple[torch.Tensor, ...]:
        """Inputs of these sizes to trace with (a prompt's `sequence` tokens after `past`)."""
        config = self.model.config
        shape = (batch, config.num_key_value_heads, past, config.head_dim)
        # One tensor per cache input: the tracer takes one tensor passed twice for one input.
        caches = [torch.zeros(shape) for _ in range(2 * config.num_hidden_layers)]
        return (
            torch.zeros(batch, sequence, dtype=torch.long),
            torch.ones(batch, past + sequence, dtype=torch.long),
            torch.arange(past, past + sequence).expand(batch, sequence),
            *caches,
        )

    def dynamic_shapes(self, batch: Any, sequence: Any, past: Any, total: Any) -> tuple:
        """``torch.export``'s `dynamic_shapes` for `example_inputs`, given each size's Dim
        (or None where it is static)."""
        cache = {0: batch, 2: past}
        return (
            {0: batch, 1: sequence},
            {0: batch, 1: total},
            {0: batch, 1: sequence},
            tuple([cache] * (2 * self.model.config.num_hidden_layers)),  # the *past arguments
        )

    def names(self) -> tuple[list[str], list[str]]:
        """Input and output names, as Hugging Face's Optimum writes them."""
        layers = range(self.model.config.num_hidden_layers)
        past = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        present = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class RuntimeDecoder:
    """What a runner of an exported `DecoderWithPast` shares: greedy decoding through the
    runtime's own cache. A runner says how one call goes (`_step`: a row of new token ids and
    the cache so far in; the last position's logits and the grown cache out) and what an
    empty cache is."""

    def _step(self, ids: list[int], past: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        raise NotImplementedError

    def empty_cache(self) -> list[Any]:
        raise NotImplementedError

    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt`: the prompt in one call, then a token per call."""
        logits, past = self._step(list(prompt), self.empty_cache())
        out: list[int] = []
        while len(out) < max_new_tokens:
            out.append(int(logits.argmax()))
            if len(out) < max_new_tokens:
                logits, past = self._step([out[-1]], past)
        return out
