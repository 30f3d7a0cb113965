"""Log-likelihood of text: total bits, bits per character and per byte, perplexity.

A document longer than the model's context is scored in windows of at most `context` input
tokens that move by `stride`: every token is scored exactly once, by the window that gives it
the most context (the first window scores all its tokens, each later one only its last
`stride`). With ``stride == context`` the windows do not overlap: these are exactly
lm-evaluation-harness's rolling windows, so a perplexity here equals its ``word_perplexity``.
Smaller strides cost more compute and give each token more context.

`streaming_token_bits` scores a text of any length in one pass through a cache of fixed size
(`slmlab.infer.SinkKVCache`), token by token, as a model that generates past its context sees it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..infer import SinkKVCache
from ..tokenizers import encoder

__all__ = ["TextScore", "count_words", "score_texts", "streaming_token_bits", "token_bits"]


@torch.no_grad()
def token_bits(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    ids: Sequence[int],
    *,
    context: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """−log2 p(ids[i] | ids[:i]) for i = 1 .. len(ids) − 1 (the first token is the condition).

    The model sees at most `context` tokens (default: its ``max_position_embeddings``) at once.
    `model` may be any callable from token ids (1, T) to logits (1, T, vocab): an exported
    model in its runtime (`slmlab.export.OnnxDecoder`), given its `context`.
    """
    context = context or model.config.max_position_embeddings
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    parameters = next(model.parameters(), None) if hasattr(model, "parameters") else None
    device = parameters.device if parameters is not None else torch.device("cpu")
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    n = len(tokens)
    out = torch.empty(max(n - 1, 0))
    scored = 1  # the next token to score; every window predicts tokens[start + 1 : end]
    while scored < n:
        end = min(n, context + 1 if scored == 1 else scored + stride)
        start = max(0, end - 1 - context)
        logits = model(tokens[start : end - 1][None])[0].float()
        nll = F.cross_entropy(logits, tokens[start + 1 : end], reduction="none") / math.log(2)
        out[scored - 1 : end - 1] = nll[scored - 1 - start :].cpu()
        scored = end
    return out


@torch.no_grad()
def streaming_token_bits(
    model: torch.nn.Module, ids: Sequence[int], *, window: int, sinks: int = 4
) -> torch.Tensor:
    """−log2 p(ids[i] | what the cache holds) for i = 1 .. len(ids) − 1, feeding one token at a
    time through a `SinkKVCache` of `sinks` + `window` positions: the first `sinks` tokens and
    the `window` latest. With ``sinks=0`` it is a plain sliding window."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = SinkKVCache(model.config, 1, window, sinks=sinks, dtype=dtype, device=device)
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    out = torch.empty(max(len(tokens) - 1, 0))
    for i in range(len(tokens) - 1):
        logits = model(tokens[i : i + 1][None], cache=cache)[0, -1].float()
        out[i] = (torch.logsumexp(logits, -1) - logits[tokens[i + 1]]).cpu() / math.log(2)
    return out


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for ``word_perplexity``: pieces between runs
    of whitespace (so leading or trailing whitespace counts as one more, empty, word)."""
    return len(re.split(r"\s+", text))


@dataclass(frozen=True)
class TextScore:
    """Bits summed over texts, with what they were spread over."""

    bits: float
    tokens: int
    chars: int
    bytes: int
    words: int

    @property
    def bits_per_char(self) -> float:
        return self.bits / self.chars

    @property
    def bits_per_byte(self) -> float:
        return self.bits / self.bytes

    @property
    def perplexity(self) -> float:
        """Per-token perplexity, 2 ** (bits per token): comparable only across one tokenizer."""
        return 2 ** (self.bits / self.tokens)

    @property
    def word_perplexity(self) -> float:
        """2 ** (bits per word): lm-evaluation-harness's ``word_perplexity``."""
        return 2 ** (self.bits / self.words)

    @property
    def byte_perplexity(self) -> float:
        return 2 ** (self.bits / self.bytes)


def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    separator: int,
    score_end: bool = True,
    context: int | None = None,
    stride: int | None = None,
) -> TextScore:
    """Bits of each text given that a document starts (``separator`` before it), summed.

    With `score_end` the model must also predict the ``separator`` that ends the text (how the
    training loop scores whole stories); without it, the text alone is scored, which is
    lm-evaluation-harness's ``loglikelihood_rolling``. `tokenizer` is a ``tokenizers.Tokenizer``
    (what `slmlab.load_tokenizer` returns) or slmlab's `BPETokenizer`.
    """
    encode = encoder(tokenizer)
    bits = 0.0
    tokens = chars = nbytes = words = 0
    for text in texts:
        seq = [separator, *encode(text)] + ([separator] if score_end else [])
        bits += float(token_bits(model, seq, context=context, stride=stride).sum())
        tokens += len(seq) - 1
        chars += len(text)
        nbytes += len(text.encode("utf-8"))
        words += count_words(text)
    return TextScore(bits, tokens, chars, nbytes, words)
