"""How much a text repeats itself: tiny models loop, and a number says how much."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["repeated_ngram_share"]


def repeated_ngram_share(tokens: Sequence[Hashable], n: int = 4) -> float:
    """The share of the n-grams of `tokens` (token ids, or words) that already occurred
    earlier in it: 0 for a text that never repeats a phrase of n, close to 1 for a model
    caught in a loop. 0 when the text has no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[Hashable, ...]] = set()
    repeated = total = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        repeated += gram in seen
        total += 1
        seen.add(gram)
    return repeated / total if total else 0.0
