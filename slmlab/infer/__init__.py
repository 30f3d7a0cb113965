"""Inference: generation with a KV cache (fp32 or int8), token healing, chat through a model's
template (chapter 03); speculative decoding with a draft model or prompt lookup, generation
past the context with attention sinks, continuous batching (chapter 10)."""

from ..models.decoder import KVCache
from .batching import BatchRequest, ContinuousBatcher
from .chat import Chat, ChatTemplateError, render_chat
from .generate import generate, sample_next, token_probs
from .healing import TokenHealer
from .kv_cache import Int8KVCache, SinkKVCache
from .speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeResult,
    expected_speedup,
    speculative_generate,
)

__all__ = [
    "BatchRequest",
    "Chat",
    "ChatTemplateError",
    "ContinuousBatcher",
    "Int8KVCache",
    "KVCache",
    "ModelDrafter",
    "PromptLookupDrafter",
    "SinkKVCache",
    "SpeculativeResult",
    "TokenHealer",
    "expected_speedup",
    "generate",
    "render_chat",
    "sample_next",
    "speculative_generate",
    "token_probs",
]
