"""The small architecture search: the FLOPs budget, the Pareto front, and a cached search."""

from __future__ import annotations

import itertools
import json
import random

import pytest

import slmlab.train
from slmlab.data import stories
from slmlab.experiments.search import (
    candidate_config,
    pareto_front,
    search_architectures,
    steps_for_flops,
)
from slmlab.models import flops_per_token
from slmlab.train import TrainConfig

TINY = TrainConfig(
    model=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    data_size=300,
    vocab_size=300,
    seq_len=64,
    batch_size=4,
    steps=20,
    warmup_steps=4,
    lr=3e-3,
    min_lr=3e-4,
    eval_every=10,
    eval_batches=1,
)
VOCAB = 300


def tokens_flops(config: TrainConfig) -> float:
    """Training FLOPs of one step, written out: 3 × forward FLOPs per token × tokens a step."""
    model = config.model_config(vocab_size=VOCAB)
    return 3 * flops_per_token(model, config.seq_len) * config.batch_size * config.seq_len


def test_steps_spend_the_budget_and_stretch_the_schedule() -> None:
    assert steps_for_flops(TINY, 10 * tokens_flops(TINY), VOCAB) == 10
    assert steps_for_flops(TINY, 10.4 * tokens_flops(TINY), VOCAB) == 10
    assert steps_for_flops(TINY, 1.0, VOCAB) == 1  # at least one step
    deeper = {"num_hidden_layers": 4}
    per_step = tokens_flops(TINY.replace(model={**TINY.model, **deeper}))
    config = candidate_config(TINY, deeper, 40 * per_step, VOCAB)
    assert config.model["num_hidden_layers"] == 4 and config.steps == 40
    assert config.warmup_steps == 8 and config.eval_every == 40  # the base's 4 in 20, stretched
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="flops must be a positive number"):
            steps_for_flops(TINY, bad, VOCAB)


def test_the_pareto_front_is_what_no_other_row_beats_on_both() -> None:
    rows = [
        {"model": "a", "above_floor": 0.2, "decode_tokens_per_s": 100},
        {"model": "b", "above_floor": 0.1, "decode_tokens_per_s": 50},
        {"model": "c", "above_floor": 0.3, "decode_tokens_per_s": 90},  # a beats it on both
        {"model": "d", "above_floor": 0.2, "decode_tokens_per_s": 100},  # a's equal: both kept
        {"model": "e", "above_floor": 0.1, "decode_tokens_per_s": 40},  # b: as good, slower
    ]
    assert pareto_front(rows) == ["a", "b", "d"]
    rng = random.Random(0)
    for _ in range(50):  # against the definition, by brute force over every pair
        rows = [dict(model=str(i), above_floor=rng.randint(0, 4), decode_tokens_per_s=rng.randint(0, 4)) for i in range(8)]  # fmt: skip
        point = lambda r: (r["above_floor"], r["decode_tokens_per_s"])  # noqa: E731
        beaten = {
            r["model"]
            for r, o in itertools.product(rows, rows)
            if point(o) != point(r) and o["above_floor"] <= r["above_floor"]
            and o["decode_tokens_per_s"] >= r["decode_tokens_per_s"]
        }  # fmt: skip
        assert pareto_front(rows) == [r["model"] for r in rows if r["model"] not in beaten]


def test_a_search_trains_each_candidate_for_its_flops_then_reuses_it(tmp_path, monkeypatch) -> None:
    candidates = {"wide": {}, "deep": {"num_hidden_layers": 4, "hidden_size": 16}}
    budget = 6 * tokens_flops(TINY)
    texts = list(stories(5, seed=2))
    search = lambda: search_architectures(  # noqa: E731
        candidates, TINY, flops=budget, out=tmp_path, texts=texts, floor=0.15, tasks=(),
        progress=False,
    )  # fmt: skip
    rows = search()
    assert [r["model"] for r in rows] == ["wide", "deep"]
    for row in rows:
        config = candidate_config(TINY, candidates[row["model"]], budget, VOCAB)
        assert row["steps"] == config.steps
        assert row["training_flops"] == pytest.approx(config.steps * tokens_flops(config))
        assert abs(row["training_flops"] - budget) <= tokens_flops(config) / 2  # the nearest step
        (run,) = tmp_path.glob(f"{row['model']}-*")
        assert json.loads((run / "last" / "trainer.json").read_text())["step"] == config.steps
    assert rows[1]["steps"] > rows[0]["steps"]  # the narrower: more steps of the same FLOPs
    assert {r["model"] for r in rows if r["pareto"]} == set(pareto_front(rows))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached candidate was trained again")

    monkeypatch.setattr(slmlab.train, "train", no_training)
    again = search()
    assert [r["bits_per_char"] for r in again] == [r["bits_per_char"] for r in rows]


def test_an_empty_search_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="candidates is empty"):
        search_architectures({}, TINY, flops=1e9, out=tmp_path, texts=["a"])
