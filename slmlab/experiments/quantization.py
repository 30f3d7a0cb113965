"""Every quantization method on the same model, measured the same way: chapter 08's table.

The measurements are `slmlab.experiments.compare`'s. `benchmarks/quant_quality.py` runs it on
the zoo's 8M model; the chapter runs it on whatever the zoo gives it (the quick model in CI).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..quant.linear import QuantConfig, quantize_
from .compare import compare

__all__ = ["compare_methods", "plot_methods", "standard_methods"]


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


def compare_methods(
    checkpoint: str | os.PathLike, methods: dict[str, QuantConfig | None], **measure: Any
) -> list[dict[str, Any]]:
    """One row per method (None: the model as it is), measured as `slmlab.experiments.compare`
    measures (`measure`: its keywords, `texts` among them): stored bits per parameter, size on
    disk, bits/char and perplexity, the story suites' accuracy, decoding speed
    (``decode_tokens=0`` leaves it out: formats dequantized at every token are slow on a large
    model)."""
    transforms = {
        label: None
        if config is None
        else (lambda model, rows, config=config: quantize_(model, config, calibration=rows))
        for label, config in methods.items()
    }
    return compare(checkpoint, transforms, **measure)


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
