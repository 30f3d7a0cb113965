"""Sequence-level distillation: the teacher's own texts as the student's training data.

Kim and Rush (2016) train the student on what the teacher generates instead of (or beside) the
data. The student then learns the teacher's modes rather than the data's whole spread, needs
no logits, so teacher and student may tokenize differently, and gets as much text as the
teacher has time to write: the way to distil when data is scarce.

The student learns the teacher's mistakes with the rest, so synthetic data is usually filtered
before training (a verifier, a test suite, a quality classifier): `keep` takes only the texts a
checker accepts, sampling on until there are enough.
"""

from __future__ import annotations

from collections.abc import Callable
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
    keep: Callable[[str], bool] | None = None,
    max_tries: int = 100,
    progress: bool = True,
) -> list[str]:
    """`count` texts sampled from `teacher`, each begun at the document separator (the
    end-of-text token) and ended at the next one or after `max_new_tokens` tokens; with `keep`,
    the first `count` that `keep` accepts, in the order sampled (an error if it accepts fewer
    than `count` of `max_tries` × `count` samples).

    Sampling at temperature 1 without top-k draws from the teacher's own distribution; batch
    ``i`` is seeded with ``seed + i``, so the same call gives the same texts."""
    if count <= 0:
        raise ValueError(f"count must be a positive number of texts, got {count}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be 1 or more, got {max_tries}")
    fast = as_hf_tokenizer(tokenizer)
    start = fast.token_to_id(END_OF_TEXT)
    if start is None:
        raise ValueError(f"the teacher's tokenizer has no {END_OF_TEXT} token to begin texts at")
    from tqdm.auto import tqdm

    teacher.eval()
    texts: list[str] = []
    sampled, batch = 0, 0
    with tqdm(total=count, desc="teacher writing", disable=not progress) as bar:
        while len(texts) < count:
            if sampled >= max_tries * count:
                raise ValueError(
                    f"keep accepted {len(texts)} of {sampled} texts the teacher wrote, fewer "
                    f"than the {count} asked for: loosen keep or raise max_tries"
                )
            # Without `keep` every text counts, so the batches stop at `count` exactly.
            rows = min(batch_size, count - len(texts)) if keep is None else batch_size
            out = generate(
                teacher, [[start]] * rows, max_new_tokens, temperature=temperature,
                top_k=top_k, seed=seed + batch, stop_tokens=start,
            )  # fmt: skip
            sampled, batch = sampled + rows, batch + 1
            written = [fast.decode(ids[1:], skip_special_tokens=True).strip() for ids in out]
            accepted = [t for t in written if keep is None or keep(t)][: count - len(texts)]
            texts += accepted
            bar.update(len(accepted))
    return texts
