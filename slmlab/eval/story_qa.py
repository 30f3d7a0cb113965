"""Story questions put to a chat model: exact match and hallucination rate (chapter 06).

The model is asked each `slmlab.data.story_qa` question in its own chat template and answers by
greedy decoding; `slmlab.data.story_qa.score_answers` compares the replies with the answers the
grammar knows. `word_similarity` says how alike a model's embedding holds the words an answer
names: words that pre-training never had to tell apart come out of it nearly one vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data.story_qa import QAExample, score_answers
from ..infer.generate import generate
from ..models.decoder import DecoderLM
from ..templates import ChatTemplateError, render_chat
from ..tokenizers import as_hf_tokenizer

__all__ = ["answer_questions", "story_qa_scores", "word_similarity"]


def answer_questions(
    model: DecoderLM,
    tokenizer: Any,
    settings: dict[str, Any],
    examples: Sequence[QAExample],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """The model's greedy reply to each example's question, written in the chat template of
    `settings` (`slmlab.checkpoint.load_chat_settings`), up to the end of its turn or
    `max_new_tokens` (the longest answers, such as "No, Omar did not.", are 10 of stories-8m's
    tokens)."""
    if not settings.get("chat_template"):
        raise ChatTemplateError("this model has no chat template: fine-tune it to chat first")
    tokenizer = as_hf_tokenizer(tokenizer)
    special = {k: v for k, v in settings.items() if k.endswith("_token")}
    prompts = [
        tokenizer.encode(
            render_chat(settings["chat_template"], e.messages(with_answer=False), **special),
            add_special_tokens=False,
        ).ids
        for e in examples
    ]
    end = tokenizer.token_to_id(settings.get("eos_token") or "")
    stops = [end] if end is not None else None
    # Batches of prompts of like length: a batch is padded to its longest prompt.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = generate(model, [prompts[i] for i in chunk], max_new_tokens, stop_tokens=stops)
        for i, ids in zip(chunk, out, strict=True):
            replies[i] = tokenizer.decode(ids[len(prompts[i]) :], skip_special_tokens=True)
    return replies


def story_qa_scores(
    model: DecoderLM, tokenizer: Any, settings: dict[str, Any], examples: Sequence[QAExample]
) -> dict[str, float]:
    """Exact match, hallucination rate and each question kind's exact match on `examples`."""
    return score_answers(examples, answer_questions(model, tokenizer, settings, examples))


def word_similarity(model: DecoderLM, tokenizer: Any, words: Sequence[str]) -> float:
    """The mean cosine similarity, over every pair of `words`, of their rows in `model`'s input
    embedding, each word spelt as a story spells it (after a space) and one token long."""
    if len(words) < 2:
        raise ValueError(f"need two words or more to compare, got {list(words)!r}")
    tokenizer = as_hf_tokenizer(tokenizer)
    rows = []
    for word in words:
        ids = tokenizer.encode(f" {word}", add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"word {word!r} is {len(ids)} tokens in this tokenizer; need one")
        rows.append(ids[0])
    with torch.no_grad():
        unit = torch.nn.functional.normalize(model.model.embed_tokens.weight[rows].float(), dim=-1)
        cosines = unit @ unit.T
    n = len(rows)  # the mean off the diagonal: every pair, each counted from both sides
    return float((cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1)))
