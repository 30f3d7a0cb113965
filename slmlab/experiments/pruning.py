"""Pruning and low rank on one model, measured the same way: chapter 09's curves and tables.

`sparsity_sweep` prunes a fresh copy of the model with each method at each sparsity (and each
N:M pattern) and measures it with `slmlab.experiments.compare`; `plot_sweep` draws perplexity
against sparsity, one line per method. `benchmarks/prune_quality.py` runs it on the real model.
`recovery_curve` trains a pruned model to win quality back (distilled from the unpruned one, or
fine-tuned) and scores it as it goes: `benchmarks/prune_recovery.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import load, save
from ..distill import train_distill
from ..lowrank import LowRankConfig, low_rank_
from ..models import DecoderLM
from ..prune import PruneConfig, StructureConfig, prune_, prune_structure_
from ..train import TrainConfig, train
from ..train.data import build_data
from .compare import Transform, compare

__all__ = [
    "low_rank_transforms",
    "plot_sweep",
    "prune_transforms",
    "recovery_curve",
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
    sparsities: Sequence[float] | Mapping[str, Sequence[float]] = (0.3, 0.5, 0.6),
    patterns: Sequence[str] = ("2:4",),
    **measure: Any,
) -> list[dict[str, Any]]:
    """The dense model, then every method at every sparsity and pattern; rows as `compare`'s
    with the ``method``, ``sparsity`` and ``pattern`` of each (``measure``: `compare`'s keywords,
    `texts` among them). `sparsities` may name each method's own (method → sparsities: a slow
    method at fewer points), with one dense row for all."""
    measure.setdefault("decode_tokens", 0)
    measure.setdefault("tasks", ())
    measure.setdefault("disk", False)  # zeros are stored like any weight: the size is the dense one
    if isinstance(sparsities, Mapping):
        unknown = sorted(set(sparsities) - set(methods))
        if unknown:
            raise ValueError(f"sparsities names {unknown}, which are not among methods {methods}")
    each = {
        m: sparsities.get(m, ()) if isinstance(sparsities, Mapping) else sparsities for m in methods
    }
    configs = {f"{m} {s:.0%}": PruneConfig(m, s) for m in methods for s in each[m] if s > 0}
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


def recovery_curve(
    pruned: DecoderLM,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    texts: Sequence[str] | Mapping[str, Sequence[str]],
    teacher: str | os.PathLike | None = None,
    data: str = "python-docs",
    data_size: int = 20_000,
    steps: int = 48,
    every: int = 12,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 1e-4,
    prepare: Callable[[DecoderLM], object] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train `pruned` to win back what pruning cost, scoring `texts` as `compare` does at step
    0 and every `every` steps: rows of ``step``, ``tokens`` trained on and ``perplexity``, or,
    for named sets of texts (a mapping), the perplexity on each under its name.

    With a `teacher` (the unpruned model's checkpoint directory) the model learns the teacher's
    next-token distributions on `data` (chapter 07's forward KL, mixed with the data's
    cross-entropy); without one it is fine-tuned on `data`'s next tokens (`data_size`: how many
    stories, where `data` is ``stories``). `prepare` changes the
    model before it trains: ``pack_2to4_`` keeps a 2:4 model's pattern, since only the kept
    values are parameters. The run (its checkpoints, metrics and loss plot) goes to `out`."""
    from ..eval import score_texts
    from ..tokenizers import END_OF_TEXT

    if every <= 0 or steps % every:
        raise ValueError(f"every ({every}) must be a positive divisor of steps ({steps})")
    out = Path(out)
    start = save(pruned, out / "start", tokenizer)
    model_fields = {
        k: v
        for k, v in dataclasses.asdict(pruned.config).items()
        if k not in ("vocab_size", "eos_token_id")
    }
    config = TrainConfig(
        model=model_fields,
        data=data,
        data_size=data_size,
        seq_len=seq_len,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=0,
        weight_decay=0.0,  # pull the weights towards the teacher, not towards zero
        eval_every=every,
        eval_batches=2,
        seed=seed,
        init_from=str(start),
        distill=None if teacher is None else {"teacher": str(teacher)},
    )
    train_data = build_data(config, tokenizer=tokenizer)
    teacher_model = None if teacher is None else load(teacher)
    separator = tokenizer.token_to_id(END_OF_TEXT)
    named = texts if isinstance(texts, Mapping) else {"perplexity": texts}

    def row(model: DecoderLM, step: int) -> dict[str, Any]:
        scores = {
            name: score_texts(model.eval(), tokenizer, held_out, separator=separator)
            for name, held_out in named.items()
        }
        return {"step": step, "tokens": step * batch_size * seq_len} | {
            name: 2 ** (score.bits / score.tokens) for name, score in scores.items()
        }

    first = copy.deepcopy(pruned)
    if prepare is not None:
        prepare(first)
    rows = [row(first, 0)]
    for stop in range(every, steps + 1, every):
        options: dict[str, Any] = {
            "max_steps": stop,
            "resume": stop > every,
            "data": train_data,
            "prepare": prepare,
            "progress": progress,
        }
        if teacher_model is None:
            train(config, out / "run", **options)
        else:
            train_distill(config, out / "run", teacher=teacher_model, **options)
        rows.append(row(load(out / "run" / "last"), stop))
    return rows
