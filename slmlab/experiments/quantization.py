"""Every quantization method on the same model, measured the same way: chapter 08's table.

For each method: stored bits per parameter, bytes of the checkpoint on disk,
bits per character and per-token perplexity on held-out stories, accuracy on the story suites
(`slmlab.eval`), and batch-1 decoding speed. `benchmarks/quant_quality.py` runs it on the zoo's
8M model; the chapter runs it on whatever the zoo gives it (the quick model in CI).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..quant.calibrate import calibration_tokens
from ..quant.linear import QuantConfig, quantize_

__all__ = ["bits_per_parameter", "compare_methods", "plot_methods", "standard_methods"]


def standard_methods(group_size: int) -> dict[str, QuantConfig | None]:
    """The chapter's line-up, with one group size for every 4- and 3-bit method."""
    g = group_size
    return {
        "fp32": None,
        "int8 RTN (per channel)": QuantConfig(bits=8, group_size=None),
        "LLM.int8 (W8A8 + outliers)": QuantConfig(method="llm_int8", bits=8, group_size=None),
        "SmoothQuant (W8A8)": QuantConfig(method="smoothquant", bits=8, group_size=None),
        f"int4 RTN g{g}": QuantConfig(bits=4, group_size=g),
        f"NF4 g{g}": QuantConfig(fmt="nf4", bits=4, group_size=g),
        f"int4 AWQ g{g}": QuantConfig(method="awq", bits=4, group_size=g),
        f"int4 GPTQ g{g}": QuantConfig(method="gptq", bits=4, group_size=g),
        f"int4 GPTQ g{g} act-order": QuantConfig(
            method="gptq", bits=4, group_size=g, act_order=True
        ),
        f"int3 RTN g{g}": QuantConfig(bits=3, group_size=g),
        f"int3 GPTQ g{g}": QuantConfig(method="gptq", bits=3, group_size=g),
        f"int4 GPTQ g{g} + int8 embedding": QuantConfig(
            method="gptq", bits=4, group_size=g, embedding_bits=8
        ),
    }


def bits_per_parameter(model: torch.nn.Module, parameters: int) -> float:
    """Stored bits of `model` (codes, scales, zeros, and what stays in full precision: norms,
    an unquantized embedding) per parameter of the original model."""
    from ..eval import model_bytes

    return 8 * model_bytes(model) / parameters


def _decode_tokens_per_s(model: torch.nn.Module, new_tokens: int = 32) -> float:
    from ..infer import generate

    prompt = torch.arange(1, 17)[None]
    generate(model, prompt, 2, stop_tokens=())  # warm-up
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        generate(model, prompt, new_tokens, stop_tokens=())
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def compare_methods(
    checkpoint: str | os.PathLike,
    methods: dict[str, QuantConfig | None],
    *,
    texts: Sequence[str],
    tasks: Sequence[str] = ("stories_who", "stories_where", "stories_what"),
    limit: int | None = None,
    calibration: str = "stories",
    calibration_rows: int = 32,
    seq_len: int = 256,
    decode_tokens: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per method (None: the model as it is), measured as the module says.

    `texts` are scored whole, each after the end-of-text token; `calibration` is the source of
    the calibration rows (`slmlab.quant.calibrate.calibration_tokens`); `decode_tokens` 0 leaves
    decoding speed out (formats that are dequantized at every token make it slow on a large model).
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
    for label, config in tqdm(methods.items(), desc="methods", disable=not progress):
        model = copy.deepcopy(original)
        start = time.perf_counter()
        if config is not None:
            quantize_(model, config, calibration=rows_of_text)
        seconds = time.perf_counter() - start
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
                "bits_per_parameter": bits_per_parameter(model, parameters),
                "disk_bytes": size,
                "bits_per_char": score.bits_per_char,
                "perplexity": 2 ** (score.bits / score.tokens),
                **accuracy,
                "decode_tokens_per_s": _decode_tokens_per_s(model, decode_tokens)
                if decode_tokens
                else None,
                "quantize_seconds": seconds,
            }
        )
    return rows


def plot_methods(rows: Sequence[dict[str, Any]]):  # -> matplotlib Figure
    """Size on disk against perplexity, one labelled point per method (lower left is better),
    and the story suites' accuracy beside it."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=[3, 2])
    for row in rows:
        x, y = row["disk_bytes"] / 2**20, row["perplexity"]
        left.scatter(x, y, color="black" if row["method"].startswith("fp32") else "C0")
        left.annotate(row["method"], (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    left.set_xscale("log")
    left.set_xlabel("checkpoint size (MiB, log scale)")
    left.set_ylabel("per-token perplexity, held-out text")
    tasks = [k for k in rows[0] if k.startswith("stories_")]
    if not tasks:
        right.set_visible(False)
    width = 0.8 / max(len(tasks), 1)
    for i, task in enumerate(tasks):
        right.barh(
            [j + i * width for j in range(len(rows))],
            [row[task] for row in rows],
            height=width,
            label=task,
        )
    right.set_yticks([j + width * (len(tasks) - 1) / 2 for j in range(len(rows))])
    right.set_yticklabels([row["method"] for row in rows], fontsize=7)
    right.axvline(0.25, color="grey", linestyle=":", label="chance")
    right.set_xlabel("accuracy")
    right.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
