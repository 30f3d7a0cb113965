"""Tokenization (chapter 02): byte-level BPE, compatible with Hugging Face tokenizer.json."""

from .bpe import GPT2_SPLIT, BPETokenizer, bytes_to_unicode, train_bpe

__all__ = ["GPT2_SPLIT", "BPETokenizer", "bytes_to_unicode", "train_bpe"]
