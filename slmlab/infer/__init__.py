"""Inference: generation with a KV cache, token healing (chapter 03; chapter 10 adds speculative
decoding)."""

from ..models.decoder import KVCache
from .generate import generate, sample_next
from .healing import TokenHealer

__all__ = ["KVCache", "TokenHealer", "generate", "sample_next"]
