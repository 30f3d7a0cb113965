"""Architectures at equal budget, measured the same way: the table and the plot of chapter 03b.

Each checkpoint gets one row: its parameters (all of them, and those one token runs through:
a mixture of experts leaves most of its experts idle), forward FLOPs per token at a given
context, the bytes its cache holds for one sequence at that context (allocated and counted:
keys and values of the attention layers, a hybrid's fixed-size states), bits per character on
held-out texts, accuracy on tasks (``stories_who`` asks for a name the story gave at its
opening: the long-range copy that a sliding window can lose), and batch-1 decoding speed.

Decoding runs the blocks in PyTorch for every model (`slmlab.kernels.disabled`): the compiled
step of `slmlab.kernels` exists for the Llama block alone, and would compare kernels, not
architectures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .compare import decode_tokens_per_s

__all__ = ["compare_architectures"]


def compare_architectures(
    checkpoints: Mapping[str, str | os.PathLike],
    *,
    texts: Sequence[str],
    floor: float | None = None,
    tasks: Sequence[str] = ("stories_who",),
    limit: int | None = None,
    context: int = 256,
    decode_tokens: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per checkpoint (label → directory), measured as the module says. `floor` is the
    texts' entropy in bits per character, when known: ``above_floor`` is then the share by
    which a model's bits per character exceed it."""
    from .. import kernels
    from ..checkpoint import load, load_tokenizer
    from ..eval import Scorer, evaluate, load_task, score_texts
    from ..models import KVCache, flops_per_token, param_count
    from ..tokenizers import END_OF_TEXT

    loaded_tasks = [load_task(name) for name in tasks]
    rows = []
    for label, path in tqdm(checkpoints.items(), desc="models", disable=not progress):
        model, tokenizer = load(path), load_tokenizer(path)
        config = model.config
        counted = param_count(config)
        score = score_texts(model, tokenizer, texts, separator=tokenizer.token_to_id(END_OF_TEXT))
        scorer = Scorer(model, tokenizer)
        accuracy = {
            task.name: evaluate(scorer, task, limit=limit, progress=False).metrics["acc"]
            for task in loaded_tasks
        }
        with kernels.disabled(), torch.no_grad():
            speed = decode_tokens_per_s(model, decode_tokens) if decode_tokens else None
        rows.append(
            {
                "model": label,
                "config": str(config),
                "parameters": model.num_parameters(),
                "active_parameters": counted.active,
                "flops_per_token": flops_per_token(config, context),
                "cache_bytes": KVCache(config, 1, context).nbytes(),
                "bits_per_char": score.bits_per_char,
                "above_floor": None if floor is None else score.bits_per_char / floor - 1,
                **accuracy,
                "decode_tokens_per_s": speed,
            }
        )
    return rows
