"""Inference: generation with a KV cache (chapter 03; chapter 10 adds speculative decoding)."""

from ..models.decoder import KVCache
from .generate import generate, sample_next

__all__ = ["KVCache", "generate", "sample_next"]
