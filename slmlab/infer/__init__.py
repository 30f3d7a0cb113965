"""Inference: generation with a KV cache (fp32 or int8), token healing (chapter 03; chapter 10 adds speculative
decoding)."""

from ..models.decoder import KVCache
from .generate import generate, sample_next
from .healing import TokenHealer
from .kv_cache import Int8KVCache

__all__ = ["Int8KVCache", "KVCache", "TokenHealer", "generate", "sample_next"]
