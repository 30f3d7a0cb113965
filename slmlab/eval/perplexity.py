"""Log-likelihood of text: total bits, bits per character, perplexity, with a sliding window.

A document longer than the model's context is scored in windows of `context` tokens that move
by `stride`: every token is scored exactly once, by the window that gives it the most context
(the first window scores all its tokens, each later one only its last `stride`). With
``stride == context`` windows do not overlap; smaller strides cost more compute and give each
token more context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TextScore", "score_texts", "token_bits"]


@torch.no_grad()
def token_bits(
    model: torch.nn.Module,
    ids: Sequence[int],
    *,
    context: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """−log2 p(ids[i] | ids[:i]) for i = 1 .. len(ids) − 1 (the first token is the condition)."""
    context = context or model.config.max_position_embeddings
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    tokens = torch.as_tensor(list(ids), dtype=torch.long)
    n = len(tokens)
    out = torch.empty(max(n - 1, 0))
    scored = 1  # position of the next token to score
    start = 0
    while scored < n:
        end = min(start + context, n)
        window = tokens[start:end]
        logits = model(window[None])[0].float()
        nll = F.cross_entropy(logits[:-1], window[1:], reduction="none") / math.log(2)
        first = scored - start - 1  # index in nll of the first token not yet scored
        out[scored - 1 : end - 1] = nll[first:]
        scored = end
        start = end - context + stride if end < n else end
        start = max(start, 0)
    return out


@dataclass(frozen=True)
class TextScore:
    bits: float
    tokens: int
    chars: int

    @property
    def bits_per_char(self) -> float:
        return self.bits / self.chars

    @property
    def perplexity(self) -> float:
        """Per-token perplexity, 2 ** (bits per token)."""
        return 2 ** (self.bits / self.tokens)


def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    separator: int,
    context: int | None = None,
    stride: int | None = None,
) -> TextScore:
    """Bits of each text given that a document starts (``separator`` before it), ended by
    ``separator`` (the model must also predict where the text stops), summed over `texts`."""
    encode = tokenizer.encode if not hasattr(tokenizer, "encode_batch") else None
    bits = 0.0
    tokens = chars = 0
    for text in texts:
        ids = encode(text) if encode else tokenizer.encode(text).ids
        seq = [separator, *ids, separator]
        bits += float(token_bits(model, seq, context=context, stride=stride).sum())
        tokens += len(seq) - 1
        chars += len(text)
    return TextScore(bits, tokens, chars)
