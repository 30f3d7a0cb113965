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

__all__ = [
    "BITS",
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
    "max_context_length",
    "param_count",
    "published_models",
    "shape_for_params",
    "weight_bytes",
]
