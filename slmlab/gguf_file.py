"""GGUF in: llama.cpp's model files as slmlab models, without transformers.

A GGUF file holds a model's weights (often quantized in llama.cpp's block formats), its
hyper-parameters and its tokenizer as metadata under llama.cpp's key names. `read_gguf` turns one
into what a checkpoint directory holds: a `ModelConfig`, Hugging Face-named fp32 tensors and a
``tokenizer.json``. Three things differ from a Hugging Face checkpoint, and each is undone once,
here:

* tensor names (``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``);
* llama.cpp's converter permutes the rows of Llama's q and k projections (its RoPE pairs
  neighbouring channels, Hugging Face's pairs the two halves of a head): `unpermute_rows`;
* the tokenizer is a list of tokens, merges and special ids: `tokenizer_json` rebuilds the
  ``tokenizer.json`` that ``tokenizers`` loads, with the pre-tokenizer the file names.

Block formats are dequantized by the ``gguf`` package's own code (``gguf.quants.dequantize``),
the reference implementation that ships with llama.cpp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.config import ModelConfig
from .tokenizers.bpe import byte_level, hf_tokenizer_json

__all__ = [
    "SUPPORTED_TYPES",
    "GGUFError",
    "GGUFModel",
    "gguf_name",
    "hf_name",
    "permute_rows",
    "read_gguf",
    "read_gguf_metadata",
    "read_gguf_tokenizer",
    "tokenizer_json",
    "unpermute_rows",
]

# The tensor types llama.cpp writes for Llama-family models (F32 for norms; the rest for matrices).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
ARCHITECTURES = ("llama", "qwen2")

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Byte-level pre-tokenizers, by the name llama.cpp's converter writes in tokenizer.ggml.pre.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            byte_level(use_regex=False),
        ],
    }


PRE_TOKENIZERS = {
    "default": lambda: byte_level(use_regex=True),
    "gpt-2": lambda: byte_level(use_regex=True),
    # SmolLM: every digit its own pre-token, then GPT-2's split (its tokenizer.json, as trained).
    "smollm": lambda: {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            byte_level(use_regex=True),
        ],
    },
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_REGEX),
    "llama3": lambda: _split_then_bytes(_LLAMA3_REGEX),
    "qwen2": lambda: _split_then_bytes(_QWEN2_REGEX),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


class GGUFError(ValueError):
    """A GGUF file slmlab cannot read; the message names the file and the field."""


@dataclass
class GGUFModel:
    """What a GGUF file holds, as a checkpoint directory would hold it."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # Hugging Face names, fp32
    tokenizer: str  # tokenizer.json
    tensor_types: dict[str, str]  # the GGUF type each tensor was stored in (Q4_1, F32...)
    metadata: dict[str, Any]  # every scalar field: general.name, tokenizer.chat_template, ...


def hf_name(name: str) -> str | None:
    """The Hugging Face name of GGUF tensor `name` (None for one a Llama model does not have)."""
    stem, dot, kind = name.rpartition(".")
    if not dot or kind not in ("weight", "bias"):
        return None
    if stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{kind}"
    return None


def gguf_name(name: str) -> str | None:
    """The GGUF name of Hugging Face tensor `name`: `hf_name` the other way."""
    stem, _, kind = name.rpartition(".")
    for gguf, hf in _TOP_TENSORS.items():
        if stem == hf:
            return f"{gguf}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for gguf, hf in _BLOCK_TENSORS.items():
            if parts[3] == hf:
                return f"blk.{parts[2]}.{gguf}.{kind}"
    return None


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a Llama q or k projection: `unpermute_rows` the other way."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order of a Llama q or k projection (`heads` of them, kv heads for k).

    Its converter interleaves each head's two halves (rows 0, d/2, 1, d/2 + 1, ...) so that its
    RoPE can rotate neighbouring channels; Hugging Face's rotates channel i with i + d/2."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _scalar(field) -> Any:
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _metadata(reader, where: Path) -> dict[str, Any]:
    """Every field but the long arrays (tokens, merges, token types), read on demand."""
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):  # fmt: skip
            continue
        try:
            out[key] = _scalar(field)
        except Exception as err:  # a field gguf cannot decode: say which one
            raise GGUFError(f"{where}: cannot read metadata field {key!r} ({err})") from None
    return out


def _field(meta: dict, key: str, where: Path, kind: type | tuple = int) -> Any:
    if key not in meta:
        raise GGUFError(f"{where}: metadata field {key!r} is missing")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise GGUFError(f"{where}: metadata field {key!r} is {value!r}, not a {kind}")
    return value


def _config(meta: dict, where: Path, vocab: int, tied: bool, biased: bool) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{where}: general.architecture is {arch!r}; slmlab reads the Llama family "
            f"({', '.join(ARCHITECTURES)})"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(
            f"{where}: {arch}.rope.scaling.type is {scaling!r}; slmlab reads unscaled RoPE"
        )
    hidden = _field(meta, f"{arch}.embedding_length", where)
    heads = _field(meta, f"{arch}.attention.head_count", where)
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count"))
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_field(meta, f"{arch}.feed_forward_length", where),
            num_hidden_layers=_field(meta, f"{arch}.block_count", where),
            num_attention_heads=heads,
            num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
            head_dim=head_dim if head_dim not in (None, hidden // heads) else None,
            max_position_embeddings=_field(meta, f"{arch}.context_length", where),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(
                _field(meta, f"{arch}.attention.layer_norm_rms_epsilon", where, float)
            ),
            tie_word_embeddings=tied,
            attention_bias=biased,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            model_type=arch,
        )
    except ValueError as err:
        raise GGUFError(f"{where}: {err}") from None


def tokenizer_json(
    tokens: list[str],
    merges: list[str],
    token_types: list[int] | None,
    pre: str,
    *,
    where: Path | str = "<gguf>",
) -> str:
    """The ``tokenizer.json`` of a byte-level BPE (``tokenizer.ggml.model = gpt2``) described by
    GGUF metadata: the vocabulary in file order, the merges, control and user-defined tokens as
    added tokens (matched whole, never split), and the pre-tokenizer `pre` names."""
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{where}: tokenizer.ggml.pre is {pre!r}; slmlab rebuilds {sorted(PRE_TOKENIZERS)}"
        )
    types = list(token_types) if token_types is not None else [1] * len(tokens)
    added = [
        (i, token, kind == _CONTROL)
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    return hf_tokenizer_json(
        {token: i for i, token in enumerate(tokens)},
        (m.split(" ", 1) for m in merges),
        added,
        PRE_TOKENIZERS[pre](),
        post_processor=byte_level(use_regex=True, add_prefix_space=True) | {"trim_offsets": False},
    )


def _strings(reader, key: str, where: Path) -> list[str]:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"{where}: metadata field {key!r} is missing: no tokenizer to rebuild")
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _tokenizer(reader, meta: dict, where: Path) -> str:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(
            f"{where}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; slmlab "
            "rebuilds byte-level BPE tokenizers ('gpt2')"
        )
    tokens = _strings(reader, "tokenizer.ggml.tokens", where)
    merges = _strings(reader, "tokenizer.ggml.merges", where)
    types = reader.fields.get("tokenizer.ggml.token_type")
    kinds = None if types is None else [int(types.parts[i][0]) for i in types.data]
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    return tokenizer_json(tokens, merges, kinds, pre, where=where)


def _open(path: str | os.PathLike):  # -> (gguf.GGUFReader, metadata, path)
    import gguf

    where = Path(path)
    if not where.is_file():
        raise GGUFError(f"{where}: no such file")
    with where.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{where}: not a GGUF file (its first bytes are not 'GGUF')")
    try:
        reader = gguf.GGUFReader(where)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise GGUFError(f"{where}: cannot read the file ({err}); is it truncated?") from None
    return reader, _metadata(reader, where), where


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every scalar and short field of GGUF file `path` (not its tensors, tokens or merges)."""
    return _open(path)[1]


def read_gguf_tokenizer(path: str | os.PathLike) -> str:
    """The ``tokenizer.json`` of GGUF file `path`, without reading its tensors."""
    reader, meta, where = _open(path)
    return _tokenizer(reader, meta, where)


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a Llama-family GGUF file: config, dequantized tensors, tokenizer and chat template."""
    import gguf

    reader, meta, where = _open(path)
    tensors, types = {}, {}
    for tensor in reader.tensors:
        name, kind = hf_name(tensor.name), tensor.tensor_type.name
        if name is None:
            if tensor.name.endswith("rope_freqs.weight"):
                raise GGUFError(f"{where}: tensor {tensor.name!r}: scaled RoPE is not supported")
            raise GGUFError(f"{where}: tensor {tensor.name!r} is not part of a Llama-family model")
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{where}: tensor {tensor.name!r} is stored as {kind}; slmlab reads "
                f"{', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest dim first
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            tensors[name] = torch.from_numpy(np.array(values, np.float32)).reshape(shape)
        except (ValueError, AssertionError) as err:
            raise GGUFError(f"{where}: tensor {tensor.name!r} is damaged ({err})") from None
        types[name] = kind
    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{where}: no token_embd.weight tensor")
    tokenizer = _tokenizer(reader, meta, where)
    config = _config(
        meta,
        where,
        vocab=tensors["model.embed_tokens.weight"].shape[0],
        tied="lm_head.weight" not in tensors,
        biased=any(n.endswith("q_proj.bias") for n in tensors),
    )
    if config.model_type == "llama":  # llama.cpp's converter permutes Llama's q and k rows only
        for i in range(config.num_hidden_layers):
            for proj, heads in (
                ("q", config.num_attention_heads),
                ("k", config.num_key_value_heads),
            ):
                key = f"model.layers.{i}.self_attn.{proj}_proj.weight"
                if key in tensors:
                    tensors[key] = unpermute_rows(tensors[key], heads)
    return GGUFModel(config, tensors, tokenizer, types, meta)
