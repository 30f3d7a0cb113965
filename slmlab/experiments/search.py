"""A small architecture search (chapter 03b): candidates trained for the same FLOPs, then kept
by quality and by speed.

Neural architecture search, as the survey describes it for small models, is a search over
shapes and options under a budget. At book scale it can be done honestly, without a proxy: every
candidate is a set of changes to one base recipe's model, trained on the same rows in the same
order for as many steps as spend the same training FLOPs (3 × forward FLOPs per token × tokens
seen: a forward pass, and a backward pass of about twice its work), with the base's schedule
stretched to those steps. Each is then measured by `compare_architectures` (bits per character
above the entropy floor, the long-range copy, batch-1 decoding speed, the cache), and the search
keeps the Pareto front: the candidates that no other one beats both on quality and on speed.

A run is cached in ``out`` under its label and its training config's fingerprint, so that a
second search with the same candidates and budget measures again and trains nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .architectures import compare_architectures

if TYPE_CHECKING:
    from ..train import TrainConfig

__all__ = ["candidate_config", "pareto_front", "search_architectures", "steps_for_flops"]


def _forward_flops_per_step(config: TrainConfig, vocab_size: int) -> float:
    from ..models import flops_per_token

    model = config.model_config(vocab_size=vocab_size)
    return flops_per_token(model, config.seq_len) * config.batch_size * config.seq_len


def steps_for_flops(config: TrainConfig, flops: float, vocab_size: int) -> int:
    """The number of training steps of `config` that spends `flops` (forward and backward,
    3 × the forward FLOPs of each token seen; at least one step)."""
    if not flops > 0:
        raise ValueError(f"flops must be a positive number, got {flops!r}")
    return max(1, round(flops / (3 * _forward_flops_per_step(config, vocab_size))))


def candidate_config(
    base: TrainConfig, changes: Mapping[str, Any], flops: float, vocab_size: int
) -> TrainConfig:
    """`base` with `changes` to its model, trained for `flops`: as many steps as spend them, a
    warm-up of the same share of those steps as the base's, and one validation, at the end."""
    changed = base.replace(model={**base.model, **changes})
    steps = steps_for_flops(changed, flops, vocab_size)
    warmup = min(steps - 1, round(base.warmup_steps * steps / base.steps))
    return changed.replace(steps=steps, warmup_steps=warmup, eval_every=steps)


def pareto_front(
    rows: Sequence[Mapping[str, Any]],
    *,
    lower: str = "above_floor",
    higher: str = "decode_tokens_per_s",
) -> list[str]:
    """The models of `rows` that no other row dominates: none is at least as good on both
    measures (`lower` smaller is better, `higher` larger is better) and better on one. In the
    order of `rows`."""

    def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        at_least = a[lower] <= b[lower] and a[higher] >= b[higher]
        return at_least and (a[lower] < b[lower] or a[higher] > b[higher])

    return [r["model"] for r in rows if not any(dominates(o, r) for o in rows if o is not r)]


def search_architectures(
    candidates: Mapping[str, Mapping[str, Any]],
    base: TrainConfig,
    *,
    flops: float,
    out: str | os.PathLike,
    texts: Sequence[str],
    floor: float | None = None,
    tasks: Sequence[str] = ("stories_who",),
    limit: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train every candidate (label → changes to ``base.model``) for `flops` training FLOPs
    into ``out`` (or find it there, trained), and measure each as `compare_architectures`
    does. Each row adds ``steps``, ``training_flops`` (what its steps spent) and ``pareto``
    (on the front of `above_floor` against decoding speed; with no `floor`, of bits per
    character)."""
    from ..train import build_data, train
    from ..train.state import LAST, checkpoint_step

    if not candidates:
        raise ValueError("candidates is empty: name at least one set of changes to the model")
    out = Path(out)
    data = build_data(base)  # one tokenizer and one order of rows for every candidate
    configs = {
        label: candidate_config(base, changes, flops, data.vocab_size)
        for label, changes in candidates.items()
    }
    runs = {label: out / f"{label}-{config.fingerprint()}" for label, config in configs.items()}
    for label, config in tqdm(configs.items(), desc="training", disable=not progress):
        if checkpoint_step(runs[label] / LAST) != config.steps:
            resume = (runs[label] / LAST / "trainer.json").is_file()
            train(config, runs[label], resume=resume, progress=progress, data=data)
    rows = compare_architectures(
        {label: run / LAST for label, run in runs.items()},
        texts=texts,
        floor=floor,
        tasks=tasks,
        limit=limit,
        context=base.seq_len,
        progress=progress,
    )
    for row in rows:
        config = configs[row["model"]]
        row["steps"] = config.steps
        row["training_flops"] = 3 * _forward_flops_per_step(config, data.vocab_size) * config.steps
    front = set(pareto_front(rows, lower="above_floor" if floor is not None else "bits_per_char"))
    for row in rows:
        row["pareto"] = row["model"] in front
    return rows
