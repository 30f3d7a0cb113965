"""Tokenization (chapter 02): byte-level BPE, compatible with Hugging Face tokenizer.json."""

from .bpe import END_OF_TEXT, GPT2_SPLIT, BPETokenizer, bytes_to_unicode, train_bpe
from .interop import as_hf_tokenizer, encoder

__all__ = [
    "END_OF_TEXT",
    "GPT2_SPLIT",
    "BPETokenizer",
    "as_hf_tokenizer",
    "bytes_to_unicode",
    "encoder",
    "train_bpe",
]
