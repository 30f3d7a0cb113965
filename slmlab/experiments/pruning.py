"""Pruning and low rank on one model, measured the same way: chapter 09's curves and tables.

`sparsity_sweep` prunes a fresh copy of the model with each method at each sparsity (and each
N:M pattern) and measures it with `slmlab.experiments.compare`; `plot_sweep` draws perplexity
against sparsity, one line per method. `benchmarks/prune_quality.py` runs it on the real model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..lowrank import LowRankConfig, low_rank_
from ..prune import PruneConfig, StructureConfig, prune_, prune_structure_
from .compare import Transform, compare

__all__ = [
    "low_rank_transforms",
    "plot_sweep",
    "prune_transforms",
    "sparsity_sweep",
    "structure_transforms",
]


def prune_transforms(configs: dict[str, PruneConfig]) -> dict[str, Transform]:
    """A transform per labelled `PruneConfig`: the model pruned on the calibration rows."""
    return {
        label: lambda model, rows, config=config: prune_(model, config, calibration=rows)
        for label, config in configs.items()
    }


def structure_transforms(configs: dict[str, StructureConfig]) -> dict[str, Transform]:
    """A transform per labelled `StructureConfig`: the model cut down on the calibration rows."""
    return {
        label: lambda model, rows, config=config: prune_structure_(model, config, calibration=rows)
        for label, config in configs.items()
    }


def low_rank_transforms(configs: dict[str, LowRankConfig]) -> dict[str, Transform]:
    """A transform per labelled `LowRankConfig`: the model's layers factored."""
    return {
        label: lambda model, rows, config=config: low_rank_(model, config, calibration=rows)
        for label, config in configs.items()
    }


def sparsity_sweep(
    checkpoint: str | os.PathLike,
    methods: Sequence[str] = ("magnitude", "wanda", "sparsegpt"),
    sparsities: Sequence[float] = (0.3, 0.5, 0.6),
    patterns: Sequence[str] = ("2:4",),
    **measure: Any,
) -> list[dict[str, Any]]:
    """The dense model, then every method at every sparsity and pattern; rows as `compare`'s
    with the ``method``, ``sparsity`` and ``pattern`` of each (``measure``: `compare`'s keywords,
    `texts` among them)."""
    measure.setdefault("decode_tokens", 0)
    measure.setdefault("tasks", ())
    measure.setdefault("disk", False)  # zeros are stored like any weight: the size is the dense one
    configs = {f"{m} {s:.0%}": PruneConfig(m, s) for m in methods for s in sparsities if s > 0}
    configs |= {f"{m} {p}": PruneConfig(m, pattern=p) for m in methods for p in patterns}
    rows = compare(checkpoint, {"dense": None} | prune_transforms(configs), **measure)
    for row, config in zip(rows, [None, *configs.values()], strict=True):
        row["label"] = row["method"]
        row["method"] = "dense" if config is None else config.method
        row["sparsity"] = 0.0 if config is None else config.sparsity
        row["pattern"] = None if config is None else config.pattern
    return rows


def plot_sweep(rows: Sequence[dict[str, Any]], *, title: str = ""):  # -> matplotlib Figure
    """Perplexity (log scale) against sparsity, a line per method from the dense point; N:M
    patterns as hollow markers at their sparsity."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r for r in rows if r["method"] == "dense")
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    for i, method in enumerate(methods):
        line = [
            dense,
            *sorted(
                (r for r in rows if r["method"] == method and r["pattern"] is None),
                key=lambda r: r["sparsity"],
            ),
        ]
        ax.plot(
            [r["sparsity"] for r in line],
            [r["perplexity"] for r in line],
            marker="o",
            color=f"C{i}",
            label=method,
        )
        for r in rows:
            if r["method"] == method and r["pattern"] is not None:
                ax.scatter(
                    r["sparsity"], r["perplexity"], s=80, facecolors="none", edgecolors=f"C{i}"
                )
                ax.annotate(
                    r["pattern"],
                    (r["sparsity"], r["perplexity"]),
                    fontsize=7,
                    xytext=(6, -3),
                    textcoords="offset points",
                )
    ax.axhline(dense["perplexity"], color="grey", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("share of weights removed from every linear layer but the head")
    ax.set_ylabel("perplexity on held-out text (log scale)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
