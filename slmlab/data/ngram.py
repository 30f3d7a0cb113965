"""A character n-gram language model: the classical baseline a neural model must beat.

Interpolated Witten-Bell smoothing: the probability of a character after a context mixes what
followed that context in training with the (recursively smoothed) estimate from the context one
character shorter, trusting the longer context more the more often it was seen and the fewer
different characters followed it. The recursion ends at a uniform distribution over the
alphabet plus one unseen-character slot, so every probability is positive and each
distribution sums to one (a test checks it).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

__all__ = ["CharNGram"]


class CharNGram:
    """An order-`n` character model: each character is predicted from the `n − 1` before it."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        # counts[k][context][char] for contexts of length k = 0 .. n-1
        self.counts: list[defaultdict[str, Counter[str]]] = [defaultdict(Counter) for _ in range(n)]
        self.alphabet: set[str] = set()

    def fit(self, texts: Iterable[str]) -> CharNGram:
        for text in texts:
            self.alphabet.update(text)
            for i, ch in enumerate(text):
                for k in range(self.n):
                    if i - k < 0:
                        break
                    self.counts[k][text[i - k : i]][ch] += 1
        self._totals = [{ctx: sum(c.values()) for ctx, c in level.items()} for level in self.counts]
        return self

    def prob(self, context: str, ch: str) -> float:
        """P(ch | the last n − 1 characters of context)."""
        # Uniform over the alphabet and one slot for every character never seen in training; an
        # unseen character then gets that slot's share of the mass left at each level.
        p = 1.0 / (len(self.alphabet) + 1)
        for k in range(self.n):
            if k > len(context):
                break
            ctx = context[len(context) - k :] if k else ""
            following = self.counts[k].get(ctx)
            if not following:
                continue
            total, types = self._totals[k][ctx], len(following)
            p = (following.get(ch, 0) + types * p) / (total + types)
        return p

    def bits(self, text: str) -> float:
        """Total −log2 P(text), each character given the text before it."""
        return -sum(
            math.log2(self.prob(text[max(0, i - self.n + 1) : i], ch)) for i, ch in enumerate(text)
        )

    def bits_per_char(self, texts: Iterable[str]) -> float:
        total = chars = 0.0
        for text in texts:
            total += self.bits(text)
            chars += len(text)
        return total / chars
