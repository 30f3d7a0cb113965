"""Inference: generation with a KV cache (fp32 or int8), token healing, chat through a model's
template (chapter 03; chapter 10 adds speculative decoding)."""

from ..models.decoder import KVCache
from .chat import Chat, ChatTemplateError, render_chat
from .generate import generate, sample_next
from .healing import TokenHealer
from .kv_cache import Int8KVCache

__all__ = [
    "Chat",
    "ChatTemplateError",
    "Int8KVCache",
    "KVCache",
    "TokenHealer",
    "generate",
    "render_chat",
    "sample_next",
]
