"""Checkpoints: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

For the Llama family the directory *is* a Hugging Face checkpoint: transformers'
``AutoModelForCausalLM.from_pretrained(dir)`` loads what `save` writes, and `load` reads what
transformers saves, sharded files with a ``model.safetensors.index.json`` included. Tensors are
read with safetensors only: nothing here ever unpickles a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .gguf_file import GGUFError, read_gguf, read_gguf_metadata, read_gguf_tokenizer
from .io import usual_mode
from .layers.lora import (
    LoraError,
    adapter_bytes,
    adapter_files,
    load_adapter_,
    lora_config_of,
    split_lora_state,
)
from .layers.lowrank import apply_low_rank_config, low_rank_config
from .layers.quantized import apply_quantization_config, quantization_config
from .layers.sparse import apply_sparse_config, sparse_config
from .models.config import ConfigError, ModelConfig
from .models.decoder import DecoderLM

__all__ = [
    "CheckpointError",
    "convert_gguf",
    "gguf_path",
    "load",
    "load_chat_settings",
    "load_state_dict",
    "load_tokenizer",
    "save",
]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers that some older Hugging Face checkpoints stored and that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


# Mixtral's files name its MoE block and its experts' projections their own way; the model's
# modules have the names of Qwen2-MoE and OLMoE (`slmlab.models.mlp`), renamed at the file.
_MIXTRAL_PROJECTIONS = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _mixtral_file_name(name: str) -> str:
    name = re.sub(r"\.mlp\.(gate|experts)\.", r".block_sparse_moe.\1.", name)
    return re.sub(
        r"(block_sparse_moe\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\.",
        lambda m: f"{m[1]}{_MIXTRAL_PROJECTIONS[m[2]]}.",
        name,
    )


def _mixtral_model_name(name: str) -> str:
    ours = {v: k for k, v in _MIXTRAL_PROJECTIONS.items()}
    name = re.sub(
        r"(block_sparse_moe\.experts\.\d+\.)(w1|w2|w3)\.", lambda m: f"{m[1]}{ours[m[2]]}.", name
    )
    return name.replace(".block_sparse_moe.", ".mlp.")


# Bamba's files name the MLP, its norm and the final norm their own way (Llama's names here).
_BAMBA_NAMES = (
    (".mlp.", ".feed_forward."),
    (".post_attention_layernorm.", ".pre_ff_layernorm."),
)


def _bamba_file_name(name: str) -> str:
    for ours, theirs in _BAMBA_NAMES:
        name = name.replace(ours, theirs)
    return "model.final_layernorm." + name[11:] if name.startswith("model.norm.") else name


def _bamba_model_name(name: str) -> str:
    for ours, theirs in _BAMBA_NAMES:
        name = name.replace(theirs, ours)
    prefix = "model.final_layernorm."
    return "model.norm." + name[len(prefix) :] if name.startswith(prefix) else name


# model_type -> (a model's parameter name -> the file's, the file's -> the model's)
_FILE_NAMES = {
    "mixtral": (_mixtral_file_name, _mixtral_model_name),
    "bamba": (_bamba_file_name, _bamba_model_name),
}


def save(
    model: DecoderLM,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    extra_files: dict[str, bytes] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (and `tokenizer`, if given) as a checkpoint directory at `path`.

    Everything is written to a temporary directory beside `path` and renamed into place, so a
    crash never leaves a half-written checkpoint; an existing directory at `path` is replaced.
    `extra_files` (name → bytes) go into the same directory in the same atomic step: a training
    run keeps its optimizer state beside the weights that way. `state_dict` replaces
    ``model.state_dict()`` where the caller has gathered the weights itself (a sharded model).
    A model with LoRA layers is written as its base model's weights plus a PEFT adapter
    (``adapter_config.json``, ``adapter_model.safetensors``), which `load` puts back on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(usual_mode(directory=True))
    try:
        config = model.config.to_hf_dict()
        config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        quantization = quantization_config(model)
        if quantization is not None:
            config["quantization_config"] = quantization
        low_rank = low_rank_config(model)
        if low_rank is not None:
            config["low_rank_config"] = low_rank
        sparse = sparse_config(model)
        if sparse is not None:
            config["sparse_config"] = sparse
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.detach().contiguous() for k, v in state.items()}
        lora = lora_config_of(model)
        if lora is not None:
            state, adapter = split_lora_state(state)
            extra_files = {**adapter_bytes(adapter, lora), **(extra_files or {})}
        if model.config.tie_word_embeddings:
            # The same tensors as the embedding's; stored once.
            state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
        if model.config.model_type in _FILE_NAMES:
            to_file = _FILE_NAMES[model.config.model_type][0]
            state = {to_file(k): v for k, v in state.items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp / "tokenizer.json")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for file in tmp.iterdir():  # some writers make their files private, as tempfile does
            file.chmod(usual_mode())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_tokenizer(tokenizer: Any, file: Path) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers' fast tokenizers
    if not hasattr(backend, "to_str"):
        raise TypeError(
            f"cannot save a tokenizer of type {type(tokenizer).__name__}: pass a "
            "tokenizers.Tokenizer (or an object with one at .backend_tokenizer)"
        )
    file.write_text(backend.to_str())


def load_tokenizer(path: str | os.PathLike):  # -> tokenizers.Tokenizer
    """The tokenizer of a checkpoint directory, a ``tokenizer.json`` file or a GGUF file."""
    from tokenizers import Tokenizer

    gguf = gguf_path(path)
    if gguf is not None:
        try:
            return Tokenizer.from_str(read_gguf_tokenizer(gguf))
        except GGUFError as err:
            raise CheckpointError(str(err)) from None
    file = Path(path)
    file = file / "tokenizer.json" if file.is_dir() else file
    if not file.is_file():
        raise CheckpointError(f"{file}: no tokenizer.json in this checkpoint")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise CheckpointError(f"{file}: not a valid tokenizer.json ({err})") from None


def load_chat_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The chat template and the special tokens it writes (``bos_token``, ``eos_token``...) of a
    checkpoint directory (Hugging Face's ``tokenizer_config.json``) or a GGUF file; empty where
    the model has none."""
    gguf = gguf_path(path)
    if gguf is not None:
        try:
            return _gguf_chat_settings(read_gguf_metadata(gguf), load_tokenizer(gguf))
        except GGUFError as err:
            raise CheckpointError(str(err)) from None
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    tokens = {
        k: (v.get("content") if isinstance(v, dict) else v)
        for k, v in settings.items()
        if k.endswith("_token") and isinstance(v, str | dict)
    }
    return {"chat_template": settings.get("chat_template"), **tokens}


def _gguf_chat_settings(meta: dict[str, Any], tokenizer) -> dict[str, Any]:
    names = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": names.get(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token": names.get(meta.get("tokenizer.ggml.eos_token_id")),
    }


def convert_gguf(
    gguf: str | os.PathLike, out: str | os.PathLike, *, source: str | None = None
) -> Path:
    """GGUF file `gguf` as the checkpoint directory `out` (written atomically): weights
    dequantized to fp32, ``tokenizer.json``, and ``tokenizer_config.json`` with the chat template
    and its special tokens, so that slmlab and transformers both load it as it is. `source` is
    recorded there (where the file came from)."""
    from tokenizers import Tokenizer

    try:
        read = read_gguf(gguf)  # once: weights, tokenizer and metadata
    except GGUFError as err:
        raise CheckpointError(str(err)) from None
    model = _assemble(
        read.config, read.tensors, None, Path(gguf), "its metadata", torch.float32, "cpu"
    )
    tokenizer = Tokenizer.from_str(read.tokenizer)
    settings = {
        **_gguf_chat_settings(read.metadata, tokenizer),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if source is not None:
        settings["source"] = source
    config = (json.dumps(settings, indent=2, ensure_ascii=False) + "\n").encode()
    return save(model, out, tokenizer, extra_files={"tokenizer_config.json": config})


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: malformed index ({err!r})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(n, str) for n in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: weight_map must map tensor names to shard file names (strings)"
            )
        outside = sorted({n for n in weight_map.values() if Path(n).name != n or n in ("", "..")})
        if outside:
            raise CheckpointError(
                f"{index}: weight_map names shard(s) {outside[:3]}, which are not file names in "
                "the checkpoint's directory: a shard is named as model-00001-of-00002.safetensors, "
                "beside the index"
            )
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) {missing} that do not exist")
        return files
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickle weights (*.bin/*.pt) found; slmlab loads safetensors only. "
            "Convert them where you trust the source, e.g. with transformers' save_pretrained"
        )
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, from one safetensors file or several shards."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors file ({err})") from None
    return tensors


def _is_quant_buffer(name: str) -> bool:
    return name.endswith((".codes", ".scales", ".zeros"))


def gguf_path(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: itself, or the one ``*.gguf`` of a directory that has no
    ``config.json``; None for a checkpoint directory of slmlab's own format."""
    path = Path(path)
    if path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise CheckpointError(f"{path}: holds {len(found)} GGUF files; name one of them")
        return found[0] if found else None
    return None


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DecoderLM:
    """Load a checkpoint directory (slmlab's or a Hugging Face Llama/Qwen2/SmolLM one), or a
    Llama-family GGUF file (llama.cpp's format, dequantized: `slmlab.gguf_file`).

    Weights are cast to `dtype` (fp32 by default: the fast dtype of a CPU without native bf16).
    Every tensor the model needs must be present with the right shape, and every tensor in the
    file must be used: a mismatch is an error naming the file and the tensor.
    """
    path = Path(path)
    gguf = gguf_path(path)
    if gguf is not None:
        try:
            read = read_gguf(gguf)
        except GGUFError as err:
            raise CheckpointError(str(err)) from None
        return _assemble(read.config, read.tensors, None, gguf, "its metadata", dtype, device)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        config = ModelConfig.from_json(config_file)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    if quantization is not None and quantization.get("quant_method") != "slmlab":
        raise CheckpointError(
            f"{config_file}: quantization_config of method "
            f"{quantization.get('quant_method')!r}; slmlab loads its own quantized "
            "checkpoints (and unquantized ones of any source)"
        )
    sections = json.loads(config_file.read_text())
    files = ", ".join(f.name for f in _weight_files(path))
    tensors = load_state_dict(path)
    if config.model_type in _FILE_NAMES:
        to_model = _FILE_NAMES[config.model_type][1]
        tensors = {to_model(k): v for k, v in tensors.items()}
    model = _assemble(
        config,
        tensors,
        quantization,
        path / files,
        "config.json",
        dtype,
        device,
        sections.get("low_rank_config"),
        sections.get("sparse_config"),
    )
    try:
        if adapter_files(path) is not None:  # a LoRA fine-tune: its base, then its adapter
            load_adapter_(model, path)
    except LoraError as err:
        raise CheckpointError(str(err)) from None
    return model


_CHECKED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"model\.layers\.0\.mlp\.experts\.(\d+)\.")


def _check_counts(
    config: ModelConfig, tensors: dict[str, torch.Tensor], where: Path, described_by: str
) -> None:
    """The layers and experts the config asks for against those the tensors' names hold, before
    any module is built: a config saying 200,000 layers over a two-layer file would otherwise
    spend minutes building modules only to fail on the first missing tensor."""
    for field, pattern, wanted in (
        ("num_hidden_layers", _LAYER, config.num_hidden_layers),
        ("num_experts", _EXPERT, config.num_experts),
    ):
        held = {int(m.group(1)) for name in tensors if (m := pattern.match(name))}
        missing = wanted - len(held & set(range(wanted)))  # extras: "unexpected tensor" later
        if missing and (held or wanted > 1024):
            holds = f"{len(held)} (numbered {min(held)} to {max(held)})" if held else "none"
            raise CheckpointError(
                f"{where}: {described_by} says {field} = {wanted}, but the weights hold {holds}; "
                f"correct {field} in {described_by}"
            )


def _assemble(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    quantization: dict | None,
    where: Path,
    described_by: str,
    dtype: torch.dtype,
    device: str | torch.device,
    low_rank: dict | None = None,
    sparse: dict | None = None,
) -> DecoderLM:
    """The model `config` (read from `described_by`) describes, holding `tensors` (checked name
    by name, shape by shape; an error names `where`)."""
    _check_counts(config, tensors, where, described_by)
    with torch.device("meta"):
        model = DecoderLM(config)
        if quantization is not None:
            try:
                apply_quantization_config(model, quantization)
            except (KeyError, ValueError, AttributeError) as err:
                raise CheckpointError(f"{where}: malformed quantization_config ({err})") from None
        if low_rank is not None:
            try:
                apply_low_rank_config(model, low_rank)
            except (KeyError, ValueError, AttributeError, TypeError) as err:
                raise CheckpointError(f"{where}: malformed low_rank_config ({err})") from None
        if sparse is not None:
            try:
                apply_sparse_config(model, sparse)
            except (KeyError, ValueError, AttributeError, TypeError) as err:
                raise CheckpointError(f"{where}: malformed sparse_config ({err})") from None
    expected = model.state_dict()
    if config.tie_word_embeddings:
        # Tied: one tensor. A file may still carry a copy of it under lm_head (transformers 4 did).
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    for name, meta in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: missing tensor {name!r} (shape {tuple(meta.shape)})")
        tensor = tensors[name]
        # Real numbers may come in any float dtype (they are cast); integer codes may not.
        same_kind = tensor.dtype == meta.dtype or (
            tensor.is_floating_point() and meta.is_floating_point()
        )
        if tensor.shape != meta.shape or not same_kind:
            raise CheckpointError(
                f"{where}: tensor {name!r} is {tensor.dtype} of shape "
                f"{tuple(tensor.shape)}, {described_by} implies {meta.dtype} of shape "
                f"{tuple(meta.shape)}"
            )
    unused = [n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if unused:
        raise CheckpointError(f"{where}: unexpected tensor(s) {unused[:5]} for {config}")
    for name in expected:  # a NaN loads and runs: every output would be NaN, every score 0
        tensor = tensors[name]
        if tensor.dtype in _CHECKED_FLOATS and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s): the file is "
                "damaged, or the run that wrote it diverged (resume from an earlier checkpoint)"
            )
    # Real numbers take the requested dtype; a quantized layer's codes and scales stay as stored.
    state = {
        name: tensors[name].to(dtype)
        if meta.dtype == torch.float32 and not _is_quant_buffer(name)
        else tensors[name]
        for name, meta in expected.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    # Buffers (the rotary tables) were created on meta: build them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.tie_weights()
    return model.to(device).eval()
