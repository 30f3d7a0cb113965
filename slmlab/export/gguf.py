"""GGUF out: a checkpoint as the one file llama.cpp (and wllama, Ollama, LM Studio) runs.

`to_gguf` writes with the ``gguf`` package, llama.cpp's own writer, what llama.cpp's
``convert_hf_to_gguf.py`` writes for a Llama-family model, and so what `slmlab.gguf_file`
reads back:

* the hyper-parameters under ``llama.*`` (or ``qwen2.*``) keys;
* the tokenizer as lists (tokens in id order, their types, the merges), its pre-tokenizer by
  the name llama.cpp knows it by, the special ids and the chat template;
* every tensor under llama.cpp's name, q and k rows of a Llama permuted to the order its RoPE
  reads (`slmlab.gguf_file.permute_rows`);
* matrices in the requested type, quantized by the ``gguf`` package's reference code
  (``gguf.quants.quantize``, bit for bit llama.cpp's); norms and biases stay F32, as
  llama.cpp keeps them. A matrix whose rows do not split into whole blocks falls back to F16,
  as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..gguf_file import PRE_TOKENIZERS, gguf_name, permute_rows
from ..io import atomic_path
from ..models.decoder import DecoderLM
from .common import ExportError, exportable
from .k_quants import Q4_K_BLOCK, quantize_q4_k

__all__ = ["GGUF_TYPES", "to_gguf"]

# --quant name -> (GGML tensor type, llama_ftype "MOSTLY_*" written as general.file_type)
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    # Every matrix Q4_K (or its fallback); llama-quantize's Q4_K_S also keeps a few in Q5_K/Q6_K.
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"),
}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's llama_token_type


def _pre_tokenizer_name(pre: dict, where: str) -> str:
    """The name llama.cpp gives pre-tokenizer `pre` (tokenizer.json's ``pre_tokenizer``)."""

    def same(a: Any, b: Any) -> bool:  # trim_offsets only moves offsets, never the tokens
        if isinstance(a, dict) and isinstance(b, dict):
            keys = (set(a) | set(b)) - {"trim_offsets"}
            return all(same(a.get(k), b.get(k)) for k in keys)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    for name, make in PRE_TOKENIZERS.items():
        if name != "default" and same(make(), pre):
            return name
    raise ExportError(
        f"{where}: pre_tokenizer {json.dumps(pre)[:120]} is none of the byte-level ones "
        f"llama.cpp knows by name ({', '.join(n for n in PRE_TOKENIZERS if n != 'default')}); "
        "GGUF cannot describe it"
    )


def _tokenizer_fields(tokenizer: Any, vocab_size: int, where: str) -> dict[str, Any]:
    """tokenizer.ggml.* lists of a byte-level BPE ``tokenizers.Tokenizer``."""
    doc = json.loads(tokenizer.to_str())
    model = doc.get("model", {})
    if model.get("type") != "BPE" or (doc.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(
            f"{where}: tokenizer is a {model.get('type')} model with a "
            f"{(doc.get('decoder') or {}).get('type')} decoder; GGUF export writes byte-level "
            "BPE (GPT-2's kind, tokenizer.ggml.model = gpt2)"
        )
    ids = {**model["vocab"], **{t["content"]: t["id"] for t in doc.get("added_tokens", [])}}
    if len(ids) > vocab_size or sorted(ids.values()) != list(range(len(ids))):
        raise ExportError(
            f"{where}: tokenizer ids are not 0..{len(ids) - 1} within the model's vocab_size "
            f"{vocab_size}; GGUF lists tokens by id"
        )
    tokens = [""] * len(ids)
    for token, i in ids.items():
        tokens[i] = token
    types = [_NORMAL] * len(tokens)
    for added in doc.get("added_tokens", []):
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    # The embedding may have more rows than the tokenizer has tokens: name them, as llama.cpp does.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": _pre_tokenizer_name(doc.get("pre_tokenizer") or {}, where),
    }


def _special_id(token_to_id: Any, token: str | None, default: int | None) -> int | None:
    found = None if token is None else token_to_id(token)
    return default if found is None else found


def to_gguf(
    source: str | os.PathLike | DecoderLM,
    out: str | os.PathLike,
    *,
    quant: str = "f32",
    tokenizer: Any = None,
    chat_settings: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write checkpoint `source` (a directory, a GGUF file, or a model with its `tokenizer`) as
    the GGUF file `out`, matrices in `quant` (`GGUF_TYPES`: f32, f16, bf16, q8_0, q5_1, q5_0,
    q4_1, q4_0, q4_k). The file appears whole or not at all. Returns `out`."""
    import gguf

    if quant not in GGUF_TYPES:
        raise ExportError(
            f"quant {quant!r} is not a GGUF type slmlab writes; choose one of {list(GGUF_TYPES)}"
        )
    parts = exportable(source, "GGUF", tokenizer=tokenizer, chat_settings=chat_settings)
    model, config = parts.model, parts.model.config
    where = str(source) if not isinstance(source, DecoderLM) else "model"
    if parts.tokenizer is None:
        raise ExportError("to_gguf needs the model's tokenizer: GGUF carries it (tokenizer=...)")
    if config.rope_scaling is not None:
        raise ExportError(
            f"{where}: rope_scaling {config.rope_scaling} is not written by slmlab's GGUF export "
            "(llama.cpp needs rope_freqs for it); export a model with plain RoPE"
        )
    arch = config.model_type  # "llama" or "qwen2": the llama.cpp architectures of our block
    tok = _tokenizer_fields(parts.tokenizer, config.vocab_size, where)
    matrix_type = gguf.GGMLQuantizationType[GGUF_TYPES[quant][0]]

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or parts.name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_freq_base(config.rope_theta)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_dimension_count(config.head_dim)
        if config.head_dim != config.hidden_size // config.num_attention_heads:
            w.add_key_length(config.head_dim)
            w.add_value_length(config.head_dim)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(gguf.LlamaFileType[GGUF_TYPES[quant][1]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        settings = parts.chat_settings
        eos = config.eos_token_id
        eos = (eos[0] if eos else None) if isinstance(eos, list) else eos
        tok_id = parts.tokenizer.token_to_id
        ids = {
            "bos": _special_id(tok_id, settings.get("bos_token"), config.bos_token_id),
            # A chat's end of turn (<|im_end|>) is where generation stops: llama.cpp's eos.
            "eos": _special_id(tok_id, settings.get("eos_token"), eos),
            "pad": config.pad_token_id,
        }
        if ids["bos"] is not None:
            w.add_bos_token_id(ids["bos"])
        if ids["eos"] is not None:
            w.add_eos_token_id(ids["eos"])
        if ids["pad"] is not None:
            w.add_pad_token_id(ids["pad"])
        w.add_add_bos_token(False)  # slmlab's models, like SmolLM2, never saw a leading BOS
        if settings.get("chat_template"):
            w.add_chat_template(settings["chat_template"])

        for hf, tensor in model.state_dict().items():
            if config.tie_word_embeddings and hf == "lm_head.weight":
                continue  # llama.cpp reads a missing output.weight as tied to token_embd
            key = gguf_name(hf)
            if key is None:
                raise ExportError(f"{where}: tensor {hf!r} has no llama.cpp name")
            data = tensor.detach().to(torch.float32)
            if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in hf else config.num_key_value_heads
                data = permute_rows(data, heads)
            _add_tensor(w, key, data.numpy(), matrix_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


def _add_tensor(writer: Any, key: str, data: np.ndarray, matrix_type: Any) -> None:
    import gguf

    types = gguf.GGMLQuantizationType
    kind = matrix_type if data.ndim == 2 else types.F32
    if kind == types.Q4_K and data.shape[-1] % Q4_K_BLOCK:
        kind = types.Q5_0  # llama-quantize's fallback for a Q4_K row that is not whole blocks
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = types.F16  # llama.cpp's converter's fallback
    if kind == types.F32:
        writer.add_tensor(key, np.ascontiguousarray(data, np.float32))
    elif kind == types.F16:
        writer.add_tensor(key, data.astype(np.float16))
    elif kind == types.Q4_K:
        writer.add_tensor(key, quantize_q4_k(data), raw_dtype=kind)
    else:
        writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
