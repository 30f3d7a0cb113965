"""Models: the config, its budgets, and (chapter 03) the decoder itself."""

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
from .decoder import Attention, DecoderBlock, DecoderLM, KVCache, RMSNorm, RotaryEmbedding, SwiGLU
from .swap import ATTENTION, LINEAR_TARGETS, MLP, linear_layers, replace_module, swap_linears

__all__ = [
    "ATTENTION",
    "BITS",
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
    "SwiGLU",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "linear_layers",
    "max_context_length",
    "param_count",
    "published_models",
    "replace_module",
    "shape_for_params",
    "swap_linears",
    "weight_bytes",
]
