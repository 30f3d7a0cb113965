"""Sequence-level distillation: the teacher's own texts as the student's training data.

Kim and Rush (2016) train the student on what the teacher generates instead of (or beside) the
data. The student then learns the teacher's modes rather than the data's whole spread, needs
no logits, so teacher and student may tokenize differently, and gets as much text as the
teacher has time to write: the way to distil when data is scarce.
"""

from __future__ import annotations

from typing import Any

import torch

from ..infer.generate import generate
from ..models.decoder import DecoderLM
from ..tokenizers import END_OF_TEXT, as_hf_tokenizer

__all__ = ["teacher_texts"]


@torch.no_grad()
def teacher_texts(
    teacher: DecoderLM,
    tokenizer: Any,
    count: int,
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> list[str]:
    """`count` texts sampled from `teacher`, each begun at the document separator (the
    end-of-text token) and ended at the next one or after `max_new_tokens` tokens.

    Sampling at temperature 1 without top-k draws from the teacher's own distribution; batch
    ``i`` is seeded with ``seed + i``, so the same call gives the same texts."""
    if count <= 0:
        raise ValueError(f"count must be a positive number of texts, got {count}")
    fast = as_hf_tokenizer(tokenizer)
    start = fast.token_to_id(END_OF_TEXT)
    if start is None:
        raise ValueError(f"the teacher's tokenizer has no {END_OF_TEXT} token to begin texts at")
    from tqdm.auto import tqdm

    teacher.eval()
    texts: list[str] = []
    batches = range(0, count, batch_size)
    for i, first in enumerate(tqdm(batches, desc="teacher writing", disable=not progress)):
        rows = min(batch_size, count - first)
        out = generate(
            teacher, [[start]] * rows, max_new_tokens,
            temperature=temperature, top_k=top_k, seed=seed + i, stop_tokens=start,
        )  # fmt: skip
        texts += [fast.decode(ids[1:], skip_special_tokens=True).strip() for ids in out]
    return texts
