"""Models: the config, its budgets, and (chapter 03) the decoder itself, with its options:
sliding-window attention and a mixture of experts."""

from .budget import (
    BITS,
    ParamCount,
    PublishedModel,
    flops_per_token,
    kv_cache_bytes_per_token,
    max_context_length,
    param_count,
    published_models,
    shape_for_params,
    weight_bytes,
)
from .config import ConfigError, ModelConfig
from .decoder import Attention, DecoderBlock, DecoderLM, KVCache, RMSNorm, RotaryEmbedding
from .mlp import SparseMoE, SwiGLU, load_balancing_loss
from .swap import ATTENTION, KEEP, LINEAR_TARGETS, MLP, linear_layers, replace_module, swap_linears

__all__ = [
    "ATTENTION",
    "BITS",
    "KEEP",
    "LINEAR_TARGETS",
    "MLP",
    "Attention",
    "ConfigError",
    "DecoderBlock",
    "DecoderLM",
    "KVCache",
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
    "replace_module",
    "shape_for_params",
    "swap_linears",
    "weight_bytes",
]
