"""Models: the config, its budgets, and (chapter 03) the decoder itself, with its options:
sliding-window attention, a mixture of experts, and Mamba-2 layers beside attention."""

from .budget import (
    BITS,
    ParamCount,
    PublishedModel,
    flops_per_token,
    kv_cache_bytes_per_token,
    max_context_length,
    param_count,
    published_models,
    recurrent_state_bytes,
    shape_for_params,
    weight_bytes,
)
from .config import ConfigError, ModelConfig
from .decoder import Attention, DecoderBlock, DecoderLM, KVCache, RMSNorm, RotaryEmbedding
from .mlp import SparseMoE, SwiGLU, load_balancing_loss
from .ssm import Mamba2Mixer
from .swap import (
    ATTENTION,
    KEEP,
    LINEAR_TARGETS,
    MAMBA,
    MLP,
    linear_layers,
    replace_module,
    swap_linears,
)

__all__ = [
    "ATTENTION",
    "BITS",
    "KEEP",
    "LINEAR_TARGETS",
    "MAMBA",
    "MLP",
    "Attention",
    "ConfigError",
    "DecoderBlock",
    "DecoderLM",
    "KVCache",
    "Mamba2Mixer",
    "ModelConfig",
    "ParamCount",
    "PublishedModel",
    "RMSNorm",
    "RotaryEmbedding",
    "SparseMoE",
    "SwiGLU",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "linear_layers",
    "load_balancing_loss",
    "max_context_length",
    "param_count",
    "published_models",
    "recurrent_state_bytes",
    "replace_module",
    "shape_for_params",
    "swap_linears",
    "weight_bytes",
]
