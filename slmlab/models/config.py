"""The model configuration: one validated dataclass, in Hugging Face's own field names.

A checkpoint's ``config.json`` *is* a Hugging Face config, so the fields here keep the names a
reader will meet in every published ``config.json`` (``hidden_size``, ``num_key_value_heads``...).
Conversion to and from Hugging Face is then a matter of the few fields that differ in meaning
(architecture names, the rope settings of transformers 5), not a renaming table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "ModelConfig"]

# Architectures whose weights map one to one onto ours. Qwen2 is Llama with a bias on q, k, v.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


def _positive_real(value: Any) -> bool:
    """A finite number above 0 (not a bool, which Python counts as an integer)."""
    real = isinstance(value, int | float) and not isinstance(value, bool)
    return real and math.isfinite(value) and value > 0


class ConfigError(ValueError):
    """A model config that breaks a rule; the message names the field and the rule."""


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama family (Llama, Qwen2, SmolLM, TinyLlama...).

    ``num_key_value_heads`` picks the attention variant: equal to ``num_attention_heads`` is MHA,
    1 is MQA, anything between is GQA. ``head_dim`` defaults to ``hidden_size //
    num_attention_heads``. ``attention_bias`` puts a bias on the q, k and v projections (Qwen2).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = field(default="llama")

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                    f"({self.hidden_size}), or head_dim must be given explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        elif (
            isinstance(self.head_dim, bool)
            or not isinstance(self.head_dim, int)
            or self.head_dim <= 0
        ):
            raise ConfigError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads}): each key/value head serves "
                "a whole group of query heads"
            )
        for name in ("rope_theta", "rms_norm_eps"):  # inf and nan pass a bare "> 0"
            if not _positive_real(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("tie_word_embeddings", "attention_bias"):  # "false" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model_type not in HF_ARCHITECTURES:
            raise ConfigError(
                f"model_type must be one of {sorted(HF_ARCHITECTURES)}, got {self.model_type!r}"
            )
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ConfigError("model_type 'qwen2' always has attention_bias=True")
        if self.rope_scaling is not None:
            # Own a normalised copy: callers (transformers among them) mutate dicts they are given.
            scaling = dict(self.rope_scaling)
            if "type" in scaling:
                scaling.setdefault("rope_type", scaling.pop("type"))
            self._check_rope_scaling(scaling)
            object.__setattr__(self, "rope_scaling", scaling)

    @staticmethod
    def _check_rope_scaling(scaling: dict[str, Any]) -> None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type must be one of {list(ROPE_TYPES)}, got {rope_type!r}"
            )
        needed = {"default": (), "linear": ("factor",)}.get(
            rope_type,
            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        )
        for key in needed:
            if key not in scaling:
                raise ConfigError(f"rope_scaling of type {rope_type!r} needs the field {key!r}")
            if not _positive_real(scaling[key]):
                raise ConfigError(f"rope_scaling.{key} must be positive, got {scaling[key]!r}")

    # Derived sizes, named so a chapter can print them.
    @property
    def q_size(self) -> int:
        """Width of the concatenated query heads."""
        return self.num_attention_heads * self.head_dim  # type: ignore[operator]

    @property
    def kv_size(self) -> int:
        """Width of the concatenated key (or value) heads."""
        return self.num_key_value_heads * self.head_dim  # type: ignore[operator]

    @property
    def attention_kind(self) -> str:
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- dictionaries and Hugging Face config.json -------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict of this class's fields; unknown or missing fields are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(names)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ConfigError(f"config is missing required field(s) {missing}")
        return cls(**data)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` that transformers writes for this model (Llama or Qwen2)."""
        out: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face ``config.json`` of a Llama-family model.

        Accepts both the transformers 4 layout (``rope_theta`` and ``rope_scaling`` at the top)
        and the transformers 5 one (``rope_parameters``). Anything that would change the
        computation and that this model does not implement is refused, never ignored.
        """
        model_type = hf.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r}; slmlab loads "
                f"{sorted(HF_ARCHITECTURES)} checkpoints"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ConfigError(
                f"{source}: Llama with attention_bias/mlp_bias is not supported "
                "(q/k/v bias without an output bias is the Qwen2 architecture)"
            )
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in hf
        ]
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing}")
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=hf["num_attention_heads"],
                num_key_value_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim"),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=hf.get("tie_word_embeddings", model_type != "llama"),
                attention_bias=model_type == "qwen2",
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                model_type=model_type,
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` (Hugging Face layout)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(data, source=str(path))

    def __str__(self) -> str:
        return (
            f"{self.model_type} d={self.hidden_size} L={self.num_hidden_layers} "
            f"heads={self.num_attention_heads}/{self.num_key_value_heads} ({self.attention_kind}) "
            f"ff={self.intermediate_size} vocab={self.vocab_size}"
            f"{' tied' if self.tie_word_embeddings else ''}"
        )
