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
    weight_bytes,
)
from .config import ConfigError, ModelConfig

__all__ = [
    "BITS",
    "ConfigError",
    "ModelConfig",
    "ParamCount",
    "PublishedModel",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "max_context_length",
    "param_count",
    "published_models",
    "weight_bytes",
]
