"""Transforms of one model, measured the same way: the tables of chapters 08 and 09.

A transform takes a fresh copy of the model and the calibration rows and changes the model in
place (quantize it, prune it, cut channels out). Each row measures the result: parameters and
zero weights, stored bits per parameter of the original, the checkpoint's bytes on disk, bits
per character and per-token perplexity on held-out text, accuracy on tasks (`slmlab.eval`),
batch-1 decoding speed, and the seconds the transform took.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..env import best_seconds
from ..layers.sparse import Sparse24Linear
from ..quant.calibrate import calibration_tokens

__all__ = ["Transform", "bits_per_parameter", "compare", "decode_tokens_per_s"]

Transform = Callable[[torch.nn.Module, torch.Tensor], object]


def bits_per_parameter(model: torch.nn.Module, parameters: int) -> float:
    """Stored bits of `model` (codes, scales, zeros, and what stays in full precision: norms,
    an unquantized embedding) per parameter of the original model."""
    from ..eval import model_bytes

    return 8 * model_bytes(model) / parameters


def decode_tokens_per_s(model: torch.nn.Module, new_tokens: int = 32, repeats: int = 5) -> float:
    """Batch-1 greedy decoding speed after a 16-token prompt: the best of `repeats` runs."""
    from ..infer import generate

    prompt = torch.arange(1, 17)[None]
    generate(model, prompt, 2, stop_tokens=())  # warm-up
    run = partial(generate, model, prompt, new_tokens, stop_tokens=())
    return new_tokens / best_seconds(run, repeats=repeats)


def _zeros(model: torch.nn.Module) -> int:
    """Zero weights in the linear layers, packed 2:4 ones included."""
    weights = [
        m.dense_weight() if isinstance(m, Sparse24Linear) else m.weight
        for m in model.modules()
        if type(m) is torch.nn.Linear or isinstance(m, Sparse24Linear)
    ]
    return sum(int((w == 0).sum()) for w in weights)


def compare(
    checkpoint: str | os.PathLike,
    transforms: dict[str, Transform | None],
    *,
    texts: Sequence[str],
    tasks: Sequence[str] = ("stories_who", "stories_where", "stories_what"),
    limit: int | None = None,
    calibration: str = "stories",
    calibration_rows: int = 32,
    seq_len: int = 256,
    decode_tokens: int = 32,
    disk: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per transform (None: the model as it is), measured as the module says.

    `texts` are scored whole, each after the end-of-text token; `calibration` is the source of
    the calibration rows (`slmlab.quant.calibrate.calibration_tokens`); `decode_tokens` 0 leaves
    decoding speed out; `disk` False leaves out the checkpoint's size (``disk_bytes`` None),
    which costs writing the checkpoint: seconds for a real model.
    """
    from ..checkpoint import load, load_tokenizer, save
    from ..eval import Scorer, disk_bytes, evaluate, load_task, score_texts
    from ..tokenizers import END_OF_TEXT

    tokenizer, original = load_tokenizer(checkpoint), load(checkpoint)
    separator = tokenizer.token_to_id(END_OF_TEXT)
    seq_len = min(seq_len, original.config.max_position_embeddings)
    rows_of_text = calibration_tokens(
        tokenizer, calibration, rows=calibration_rows, seq_len=seq_len
    )
    loaded_tasks = [load_task(name) for name in tasks]
    parameters = original.num_parameters()
    rows = []
    for label, transform in tqdm(transforms.items(), desc="methods", disable=not progress):
        model = copy.deepcopy(original)
        start = time.perf_counter()
        if transform is not None:
            transform(model, rows_of_text)
        seconds = time.perf_counter() - start
        size = None
        if disk:
            with tempfile.TemporaryDirectory() as folder:
                size = disk_bytes(save(model, Path(folder) / "model"))
        score = score_texts(model, tokenizer, texts, separator=separator)
        scorer = Scorer(model, tokenizer)
        accuracy = {
            task.name: evaluate(scorer, task, limit=limit, progress=False).metrics["acc"]
            for task in loaded_tasks
        }
        rows.append(
            {
                "method": label,
                "parameters": model.num_parameters(),
                "zero_weights": _zeros(model),
                "bits_per_parameter": bits_per_parameter(model, parameters),
                "disk_bytes": size,
                "bits_per_char": score.bits_per_char,
                "perplexity": 2 ** (score.bits / score.tokens),
                **accuracy,
                "decode_tokens_per_s": decode_tokens_per_s(model, decode_tokens)
                if decode_tokens
                else None,
                "seconds": seconds,
            }
        )
    return rows
