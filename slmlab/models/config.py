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

# Architectures whose weights map one to one onto ours. Qwen2 is Llama with a bias on q, k, v;
# Mistral is Llama with a sliding window; Mixtral and Qwen2-MoE put experts in the MLP; Bamba
# mixes attention layers with Mamba-2 layers, a linear-time recurrence.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "bamba": "BambaForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
# transformers' names; "linear_attention" is a Mamba-2 layer (a recurrence that is attention
# without the softmax, with a decay: see `slmlab.models.ssm`).
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")
BIASED = ("qwen2", "qwen2_moe")  # a bias on q, k and v
EXPERTS = ("mixtral", "qwen2_moe")  # a mixture of experts in every MLP
HYBRID = ("bamba",)  # Mamba-2 layers among the attention layers
LATENT = ("deepseek_v3",)  # multi-head latent attention: keys and values from a small latent
# The Mamba-2 fields, with transformers' Bamba names and defaults scaled for a small model.
_MAMBA_FIELDS = (
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_chunk_size",
)
_HF_MAMBA_DEFAULTS = {
    "mamba_n_heads": 128,
    "mamba_d_head": "auto",
    "mamba_n_groups": 1,
    "mamba_d_state": 256,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 256,
    "mamba_conv_bias": True,
    "mamba_proj_bias": False,
}


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

    ``sliding_window`` W lets a token of a sliding layer see itself and the W - 1 tokens before
    it; ``layer_types`` says which layers slide (``"sliding_attention"``) and which see
    everything (``"full_attention"``): unset, every layer slides when W is set (Mistral) and none
    does otherwise. ``num_experts`` above 0 replaces each MLP by that many experts of
    ``moe_intermediate_size`` (default ``intermediate_size``), ``num_experts_per_tok`` of them
    chosen per token by a router, plus one always-on shared expert of
    ``shared_expert_intermediate_size`` when that is above 0 (Qwen2-MoE);
    ``norm_topk_prob`` rescales the chosen experts' weights to sum to 1 (Mixtral) and
    ``router_aux_loss_coef`` weighs the load-balancing loss in training.

    ``partial_rotary_factor`` below 1 rotates only the first part of each query and key head
    (Bamba rotates half; unset, each architecture's own). A ``"linear_attention"`` layer (model_type ``bamba``) is a Mamba-2
    mixer instead of attention: ``mamba_n_heads`` heads of ``mamba_d_head`` channels (together
    ``mamba_expand`` × hidden_size), a state of ``mamba_d_state`` per channel whose input and
    output maps are shared by ``mamba_n_groups`` groups of heads, a causal convolution of width
    ``mamba_d_conv``; training computes it ``mamba_chunk_size`` tokens at a time.

    Multi-head latent attention (model_type ``deepseek_v3``, DeepSeek-V2/V3's) reads every
    head's keys and values from one latent of ``kv_lora_rank`` channels per token, plus one
    shared key of ``head_dim`` channels that carries the rotation (``qk_rope_head_dim`` in
    transformers); the cache holds those two. Each head's query and key have
    ``qk_nope_head_dim`` more channels without rotation, its value ``v_head_dim``; queries come
    through a latent of ``q_lora_rank`` when it is set. ``rope_interleave`` is DeepSeek's layout
    of the rotated channels (pairs side by side).

    ``block_repeats`` above 1 runs each block that many times in a row, its weights shared
    (MobileLLM's immediate block-wise sharing): the depth and compute of a deeper model for the
    parameters of this one; each run keeps its own keys in the cache. Transformers has no such
    option: a checkpoint with it loads in slmlab only.
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
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01
    partial_rotary_factor: float | None = None
    mamba_n_heads: int = 0
    mamba_d_head: int | None = None
    mamba_n_groups: int = 1
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 64
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    block_repeats: int = 1

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
        # "false" would read as true
        for name in (
            "tie_word_embeddings",
            "attention_bias",
            "norm_topk_prob",
            "mamba_conv_bias",
            "mamba_proj_bias",
            "rope_interleave",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model_type not in HF_ARCHITECTURES:
            raise ConfigError(
                f"model_type must be one of {sorted(HF_ARCHITECTURES)}, got {self.model_type!r}"
            )
        if self.attention_bias != (self.model_type in BIASED):
            raise ConfigError(
                f"model_type {self.model_type!r} has attention_bias="
                f"{self.model_type in BIASED}; {BIASED} are the architectures with q/k/v biases"
            )
        self._check_sliding_window()
        self._check_experts()
        self._check_rotary_fraction()
        self._check_mamba()
        self._check_latent()
        repeats = self.block_repeats
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"block_repeats must be a positive integer, got {repeats!r}")
        if repeats > 1 and self.mamba_n_heads:
            raise ConfigError(
                "block_repeats with Mamba-2 layers is not supported (a layer's state is one per "
                "layer); repeat the blocks of an attention-only model"
            )
        if self.rope_scaling is not None:
            # Own a normalised copy: callers (transformers among them) mutate dicts they are given.
            scaling = dict(self.rope_scaling)
            if "type" in scaling:
                scaling.setdefault("rope_type", scaling.pop("type"))
            self._check_rope_scaling(scaling)
            object.__setattr__(self, "rope_scaling", scaling)

    def _check_sliding_window(self) -> None:
        window, types, kind = self.sliding_window, self.layer_types, self.model_type
        if window is not None:
            if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
                raise ConfigError(f"sliding_window must be a positive integer, got {window!r}")
            if window > self.max_position_embeddings:
                raise ConfigError(
                    f"sliding_window ({window}) is longer than max_position_embeddings "
                    f"({self.max_position_embeddings}): it would never slide; leave it unset"
                )
        if types is not None:
            if not isinstance(types, list | tuple) or len(types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types must list one type per layer ({self.num_hidden_layers}), "
                    f"got {types!r}"
                )
            unknown = [t for t in types if t not in LAYER_TYPES]
            if unknown:
                raise ConfigError(f"layer_types: {unknown[0]!r} is not one of {list(LAYER_TYPES)}")
            object.__setattr__(self, "layer_types", list(types))
            if window is None and "sliding_attention" in types:
                raise ConfigError("layer_types has sliding layers but sliding_window is unset")
            if "linear_attention" in types and kind not in HYBRID:
                raise ConfigError(
                    f"layer_types: model_type {kind!r} has no linear_attention (Mamba-2) layers; "
                    f"use {list(HYBRID)}"
                )
        if window is None:
            return
        if kind in ("llama", "qwen2_moe", *HYBRID):
            raise ConfigError(
                f"model_type {kind!r} has no sliding window; use 'mistral' (Llama's block with "
                "one) or 'qwen2' (with layer_types)"
            )
        if (
            kind in ("mistral", "mixtral")
            and types is not None
            and set(types) != {"sliding_attention"}
        ):
            raise ConfigError(
                f"model_type {kind!r} slides in every layer; for a pattern of sliding and full "
                "layers use model_type 'qwen2' with layer_types"
            )

    def _check_experts(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "shared_expert_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        size = self.moe_intermediate_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ConfigError(f"moe_intermediate_size must be a positive integer, got {size!r}")
        coef = self.router_aux_loss_coef
        real = isinstance(coef, int | float) and not isinstance(coef, bool)
        if not (real and math.isfinite(coef) and coef >= 0):
            raise ConfigError(f"router_aux_loss_coef must be a number >= 0, got {coef!r}")
        kind = self.model_type
        if kind not in EXPERTS:
            if self.num_experts or self.shared_expert_intermediate_size or size is not None:
                raise ConfigError(
                    f"model_type {kind!r} has a dense MLP: num_experts, moe_intermediate_size "
                    f"and shared_expert_intermediate_size are for {list(EXPERTS)}"
                )
            return
        if self.num_experts < 1:
            raise ConfigError(f"model_type {kind!r} needs num_experts >= 1")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_experts ({self.num_experts})"
            )
        if kind == "mixtral" and (self.shared_expert_intermediate_size or size is not None):
            raise ConfigError(
                "model_type 'mixtral' has no shared expert and its experts are "
                "intermediate_size wide: leave shared_expert_intermediate_size and "
                "moe_intermediate_size unset, or use 'qwen2_moe'"
            )
        if kind == "qwen2_moe" and not self.shared_expert_intermediate_size:
            raise ConfigError(
                "model_type 'qwen2_moe' always has a shared expert: set "
                "shared_expert_intermediate_size (or use 'mixtral', which has none)"
            )

    def _check_rotary_fraction(self) -> None:
        expected = 0.5 if self.model_type in HYBRID else 1.0  # transformers fixes Bamba's at 0.5
        if self.partial_rotary_factor is None:
            object.__setattr__(self, "partial_rotary_factor", expected)
        factor = self.partial_rotary_factor
        if factor != expected:
            raise ConfigError(
                f"partial_rotary_factor must be {expected} for model_type {self.model_type!r}, "
                f"got {factor!r}"
            )
        if self.rotary_dim % 2:
            raise ConfigError(
                f"head_dim × partial_rotary_factor ({self.rotary_dim}) must be even: the "
                "rotation turns pairs of channels"
            )

    def _check_mamba(self) -> None:
        kind, types = self.model_type, self.layer_types
        if kind not in HYBRID:
            if self.mamba_n_heads:
                raise ConfigError(
                    f"model_type {kind!r} has no Mamba-2 layers: mamba_n_heads is for {list(HYBRID)}"
                )
            return
        if types is None or "linear_attention" not in types:
            raise ConfigError(
                f"model_type {kind!r} needs layer_types with at least one 'linear_attention' "
                "(Mamba-2) layer; the others are 'full_attention'"
            )
        for name in _MAMBA_FIELDS:
            value = getattr(self, name)
            if name == "mamba_d_head" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        inner = self.mamba_intermediate_size
        if inner % self.mamba_n_heads:
            raise ConfigError(
                f"mamba_n_heads ({self.mamba_n_heads}) must divide mamba_expand × hidden_size "
                f"({inner})"
            )
        if self.mamba_d_head is None:
            object.__setattr__(self, "mamba_d_head", inner // self.mamba_n_heads)
        elif self.mamba_d_head * self.mamba_n_heads != inner:
            raise ConfigError(
                f"mamba_d_head × mamba_n_heads ({self.mamba_d_head} × {self.mamba_n_heads}) must "
                f"equal mamba_expand × hidden_size ({inner})"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ConfigError(
                f"mamba_n_groups ({self.mamba_n_groups}) must divide mamba_n_heads "
                f"({self.mamba_n_heads}): each group's input and output maps serve whole heads"
            )

    def _check_latent(self) -> None:
        kind = self.model_type
        if kind not in LATENT:
            if self.kv_lora_rank or self.q_lora_rank or self.qk_nope_head_dim or self.v_head_dim:
                raise ConfigError(
                    f"model_type {kind!r} has ordinary attention: kv_lora_rank, q_lora_rank, "
                    f"qk_nope_head_dim and v_head_dim are for {list(LATENT)}"
                )
            if self.rope_interleave:
                raise ConfigError(f"rope_interleave is DeepSeek's layout: {list(LATENT)} only")
            return
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer for {kind!r}, got {value!r}")
        q_rank = self.q_lora_rank
        if q_rank is not None and (
            isinstance(q_rank, bool) or not isinstance(q_rank, int) or q_rank <= 0
        ):
            raise ConfigError(f"q_lora_rank must be a positive integer or unset, got {q_rank!r}")
        for name in ("kv_lora_rank", "q_lora_rank"):
            rank = getattr(self, name)
            if rank is not None and rank > self.hidden_size:
                raise ConfigError(
                    f"{name} ({rank}) is above hidden_size ({self.hidden_size}): a latent wider "
                    "than what it compresses saves nothing; lower it"
                )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"model_type {kind!r} gives every head its own key and value from the latent: "
                "num_key_value_heads must equal num_attention_heads"
            )
        if self.sliding_window is not None or self.num_experts or self.mamba_n_heads:
            raise ConfigError(
                f"model_type {kind!r} is latent attention over dense MLPs here: no "
                "sliding_window, num_experts or Mamba-2 layers"
            )
        if self.rope_scaling is not None:
            raise ConfigError(
                f"model_type {kind!r}: rope_scaling is not supported (DeepSeek's YaRN also "
                "rescales the attention logits); leave it unset"
            )

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
    def sliding_layers(self) -> list[bool]:
        """For each layer, whether its attention is limited to the last `sliding_window` tokens."""
        if self.sliding_window is None:
            return [False] * self.num_hidden_layers
        if self.layer_types is None:
            return [True] * self.num_hidden_layers
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def linear_layers(self) -> list[bool]:
        """For each layer, whether it is a Mamba-2 mixer (``"linear_attention"``) instead of
        attention."""
        types = self.layer_types or ["full_attention"] * self.num_hidden_layers
        return [t == "linear_attention" for t in types]

    @property
    def cache_layers(self) -> list[bool]:
        """`linear_layers` for each run of a block, in the order the model runs them: what the
        cache keeps one slot for (block i's run r is slot i × block_repeats + r)."""
        return [m for m in self.linear_layers for _ in range(self.block_repeats)]

    @property
    def mamba_intermediate_size(self) -> int:
        """Width of a Mamba-2 layer's inner channels (0 without such layers)."""
        return self.mamba_expand * self.hidden_size if self.mamba_n_heads else 0

    @property
    def rotary_dim(self) -> int:
        """How many channels of each query and key head the rotary embedding turns."""
        return int(self.head_dim * self.partial_rotary_factor)  # type: ignore[operator,arg-type]

    @property
    def expert_size(self) -> int:
        """Width of one expert's hidden layer (0 for a dense MLP)."""
        if not self.num_experts:
            return 0
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def latent(self) -> bool:
        """Whether attention is multi-head latent attention (DeepSeek's)."""
        return self.kv_lora_rank > 0

    @property
    def attention_kind(self) -> str:
        if self.latent:
            return "MLA"
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        return "MQA" if self.num_key_value_heads == 1 else "GQA"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again). Another model_type takes its own
        partial rotary factor unless one is given."""
        if "model_type" in changes:
            changes.setdefault("partial_rotary_factor", None)
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
        if self.block_repeats > 1:
            out["block_repeats"] = self.block_repeats  # slmlab's own: transformers ignores it
        kind, window = self.model_type, self.sliding_window
        if kind in ("llama", *HYBRID, *LATENT):
            out.update(attention_bias=False, mlp_bias=False)
        if kind in LATENT:
            out.update(
                kv_lora_rank=self.kv_lora_rank,
                q_lora_rank=self.q_lora_rank,
                qk_nope_head_dim=self.qk_nope_head_dim,
                qk_rope_head_dim=self.head_dim,
                v_head_dim=self.v_head_dim,
                rope_interleave=self.rope_interleave,
                first_k_dense_replace=self.num_hidden_layers,  # every MLP dense
            )
        if kind in HYBRID:
            out.update(
                attn_layer_indices=[i for i, m in enumerate(self.linear_layers) if not m],
                **{name: getattr(self, name) for name in _MAMBA_FIELDS},
                mamba_conv_bias=self.mamba_conv_bias,
                mamba_proj_bias=self.mamba_proj_bias,
            )
        elif kind in ("mistral", "mixtral"):
            out.update(sliding_window=window)
        elif kind in ("qwen2", "qwen2_moe"):  # the window per layer
            types = ["sliding_attention" if s else "full_attention" for s in self.sliding_layers]
            out.update(use_sliding_window=window is not None, sliding_window=window)
            out.update(max_window_layers=self.num_hidden_layers, layer_types=types)
        if kind == "mixtral":
            out.update(num_local_experts=self.num_experts, router_jitter_noise=0.0)
        if kind == "qwen2_moe":
            out.update(
                num_experts=self.num_experts,
                moe_intermediate_size=self.expert_size,
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                qkv_bias=True,
            )
        if kind in EXPERTS:
            out.update(
                num_experts_per_tok=self.num_experts_per_tok,
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
            )
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face ``config.json`` of a Llama-family model.

        Accepts both the transformers 4 layout (``rope_theta`` and ``rope_scaling`` at the top)
        and the transformers 5 one (``rope_parameters``). Anything that would change the
        computation and that this model does not implement is refused, never ignored.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: must hold a JSON object, got {type(hf).__name__}")
        try:
            return cls._from_hf_dict(hf, source)
        except (TypeError, AttributeError, OverflowError) as err:
            # A field of the wrong kind (a list where a number belongs, a string where a table
            # does) that no specific check above caught: still one line naming the file.
            raise ConfigError(f"{source}: a field has the wrong type ({err})") from None

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in HF_ARCHITECTURES:
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
        experts = _hf_experts(hf, model_type, source)
        mamba = _hf_mamba(hf, model_type, source)
        latent = _hf_latent(hf, model_type, source)
        window, layer_types = _hf_sliding_window(hf, model_type)
        if mamba:
            layer_types = mamba.pop("layer_types")
        for table in ("rope_parameters", "rope_scaling"):
            if hf.get(table) is not None and not isinstance(hf[table], dict):
                raise ConfigError(f"{source}: {table} must be a table, got {hf[table]!r}")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, int | float):
            raise ConfigError(f"{source}: rope_theta must be a number, got {rope_theta!r}")
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
                head_dim=latent.pop("head_dim", hf.get("head_dim")),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-5 if model_type in HYBRID else 1e-6),
                tie_word_embeddings=hf.get(
                    "tie_word_embeddings", model_type not in ("llama", *HYBRID, *LATENT)
                ),
                attention_bias=model_type in BIASED,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                model_type=model_type,
                sliding_window=window,
                layer_types=layer_types,
                **experts,
                **mamba,
                **latent,
                block_repeats=hf.get("block_repeats", 1),
            )
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a ``config.json`` (Hugging Face layout)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(data, source=str(path))

    def __str__(self) -> str:
        return (
            f"{self.model_type} d={self.hidden_size} L={self.num_hidden_layers} "
            f"heads={self.num_attention_heads}/{self.num_key_value_heads} ({self.attention_kind}) "
            f"ff={self.intermediate_size} vocab={self.vocab_size}"
            f"{' tied' if self.tie_word_embeddings else ''}"
            + (f" window={self.sliding_window}" if self.sliding_window else "")
            + (
                f" experts={self.num_experts_per_tok}/{self.num_experts}"
                if self.num_experts
                else ""
            )
            + (
                f" mamba={sum(self.linear_layers)}/{self.num_hidden_layers}"
                if self.mamba_n_heads
                else ""
            )
            + (f" latent={self.kv_lora_rank}" if self.latent else "")
            + (f" repeats={self.block_repeats}" if self.block_repeats > 1 else "")
        )


def _hf_sliding_window(hf: dict[str, Any], model_type: str) -> tuple[Any, Any]:
    """`sliding_window` and `layer_types` from a Hugging Face config of `model_type`."""
    if model_type in ("mistral", "mixtral"):
        return hf.get("sliding_window"), None
    if model_type not in ("qwen2", "qwen2_moe") or not hf.get("use_sliding_window"):
        return None, None
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:  # transformers' own rule for Qwen2: layers from max_window_layers on slide
        start = hf.get("max_window_layers", 0)
        types = [
            "sliding_attention" if i >= start else "full_attention"
            for i in range(hf.get("num_hidden_layers", 0))
        ]
    return window, types


def _hf_experts(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Hugging Face config, or a refusal of the options
    (jitter, dense layers between sparse ones) this model does not implement."""
    if model_type not in EXPERTS:
        return {}
    if hf.get("router_jitter_noise"):
        raise ConfigError(f"{source}: router_jitter_noise is not supported (set it to 0)")
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise ConfigError(
            f"{source}: dense layers between the sparse ones (decoder_sparse_step, "
            "mlp_only_layers) are not supported: every layer must have experts"
        )
    out = {
        "num_experts": hf.get("num_local_experts" if model_type == "mixtral" else "num_experts"),
        "num_experts_per_tok": hf.get("num_experts_per_tok", 2),
        "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.01),
    }
    if model_type == "qwen2_moe":
        out.update(
            moe_intermediate_size=hf.get("moe_intermediate_size"),
            shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size"),
            norm_topk_prob=hf.get("norm_topk_prob", False),
        )
    return out


def _hf_mamba(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The Mamba-2 fields and the layer pattern of a Hugging Face hybrid config (Bamba)."""
    if model_type not in HYBRID:
        return {}
    limit = list(hf.get("time_step_limit") or (0.0, None))
    unbounded = (None, float("inf"), {"__float__": "Infinity"})  # transformers writes the last
    if len(limit) != 2 or limit[0] != 0 or limit[1] not in unbounded:
        raise ConfigError(
            f"{source}: time_step_limit {list(limit)} is not supported; only the default "
            "[0.0, inf], which leaves the time steps as they are"
        )
    if hf.get("z_loss_coefficient"):
        raise ConfigError(f"{source}: z_loss_coefficient is not supported (set it to 0)")
    attention = hf.get("attn_layer_indices") or []
    layers = hf.get("num_hidden_layers", 0)
    # transformers' defaults for what a config leaves out
    out = {**_HF_MAMBA_DEFAULTS, **{k: hf[k] for k in _HF_MAMBA_DEFAULTS if k in hf}}
    if out["mamba_d_head"] == "auto":
        out["mamba_d_head"] = None
    return {
        **out,
        "layer_types": [
            "full_attention" if i in attention else "linear_attention" for i in range(layers)
        ],
    }


def _hf_latent(hf: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """The latent-attention fields of a Hugging Face DeepSeek-V3 config (its defaults for what
    the file leaves out); its mixture of experts is refused, dense layers only."""
    if model_type not in LATENT:
        return {}
    layers = hf.get("num_hidden_layers", 0)
    dense = hf.get("first_k_dense_replace", 3)
    if not isinstance(dense, int) or isinstance(dense, bool) or dense < layers:
        raise ConfigError(
            f"{source}: first_k_dense_replace ({dense!r}) is below num_hidden_layers ({layers}): "
            "DeepSeek's mixture of experts (grouped routing over sigmoid scores) is not "
            "implemented; slmlab loads DeepSeek-V3's attention over dense MLPs"
        )
    return {
        "kv_lora_rank": hf.get("kv_lora_rank", 512),
        "q_lora_rank": hf.get("q_lora_rank", 1536),
        "qk_nope_head_dim": hf.get("qk_nope_head_dim", 128),
        "v_head_dim": hf.get("v_head_dim", 128),
        "rope_interleave": hf.get("rope_interleave", True),
        "head_dim": hf.get("qk_rope_head_dim", 64),  # the rotated channels: transformers' too
    }
