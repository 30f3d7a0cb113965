"""The one conversion between slmlab's tokenizer and Hugging Face's.

Everything that encodes text for a model (scoring, calibration, token healing) accepts either a
``tokenizers.Tokenizer`` (what `slmlab.load_tokenizer` returns) or slmlab's own `BPETokenizer`,
and turns it into the former here: the same ids (tested), and the Rust encoder is faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .bpe import BPETokenizer

__all__ = ["as_hf_tokenizer", "encoder"]


def as_hf_tokenizer(tokenizer: Any):  # -> tokenizers.Tokenizer
    """`tokenizer` as a ``tokenizers.Tokenizer``; anything else is a TypeError naming it."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, BPETokenizer):
        tokenizer = tokenizer.to_hf()
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"expected a tokenizers.Tokenizer (slmlab.load_tokenizer(path) gives one) or a "
            f"slmlab BPETokenizer, got {type(tokenizer).__name__}"
        )
    return tokenizer


def encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> ids``, with no special tokens added, for either kind of tokenizer."""
    tokenizer = as_hf_tokenizer(tokenizer)
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
