"""Evaluation (chapter 11). Perplexity and bits per character so far; task suites to come."""

from .perplexity import TextScore, score_texts, token_bits

__all__ = ["TextScore", "score_texts", "token_bits"]
