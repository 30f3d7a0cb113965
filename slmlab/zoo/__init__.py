"""The model zoo: named, seeded recipes that train themselves the first time they are asked for.

``zoo.load("stories-1m")`` returns a trained model: from the cache (``$SLMLAB_HOME/zoo``, by
default ``~/.cache/slmlab/zoo``) if it was trained before, otherwise trained in front of the
reader with a progress bar, then cached. A cached model is reused only for the very same recipe
(the directory name carries the recipe's fingerprint).

Quick mode (``SLMLAB_QUICK=1``, which the test command sets) trains each recipe for a fraction
of its steps on less data: the same code path, minutes less, numbers that are not the book's.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..kernels import cache_dir
from ..train.config import TrainConfig

__all__ = ["RECIPES", "ensure", "load", "path", "quick_mode", "recipe"]

RECIPES: dict[str, TrainConfig] = {
    # ~1M parameters; about 3 minutes on 2 CPU cores. Rows of 256 tokens hold a whole story
    # (a quarter of them are longer than 128), so the model learns to copy names from the
    # opening: at the same tokens per step, 128-token rows gave 0.305 bits/char and chance on
    # stories_who, 256-token rows 0.233 and 96%. Copying appears after a plateau (chapter 05):
    # lr 6e-3 left it about when 3e-3 did but learnt faster after it, 0.209 (3e-3: 0.233;
    # 1e-2 left it sooner, 0.2085), and half the batch for twice the steps delayed it (0.281).
    "stories-1m": TrainConfig(
        model=dict(
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        data="stories",
        data_size=20_000,
        vocab_size=1024,
        seq_len=256,
        batch_size=16,
        steps=600,
        lr=6e-3,
        min_lr=6e-4,
        warmup_steps=40,
        eval_every=100,
        seed=0,
        extra={"quick_steps": 60},
    ),
    # ~8M parameters: the teacher of later chapters, trained with Muon (chapter 05). With
    # AdamW (1200 steps, 16 minutes) it sat on the copying plateau until step ~700 and ended at
    # 0.2269 bits/char, +41% above the floor; Muon leaves the plateau by step 300. A Muon step
    # costs 45% more at 8 rows, so 1200 steps take 23 minutes (0.1957, +21%) and the recipe
    # stops at 1000: 0.2011, +25%, 19-21 minutes on 2 cores. Muon at lr 4e-3: 0.2049 after
    # 1000 steps; 16 rows a step (Newton-Schulz's cost spread over twice the tokens), 560 steps
    # at lr 3e-3: 2.3M tokens in 18 minutes but 0.2087, +29%. Rows of 256 (whole stories, as
    # stories-1m): with AdamW, 0.227 where rows of 128 gave 0.248.
    "stories-8m": TrainConfig(
        model=dict(
            hidden_size=288,
            intermediate_size=768,
            num_hidden_layers=8,
            num_attention_heads=9,
            num_key_value_heads=3,
        ),
        data="stories",
        data_size=30_000,
        # The stories' words fill 672 tokens, whatever is asked for (chapter 02): 2048, which
        # this recipe asked for before, trained the very same tokenizer.
        vocab_size=1024,
        seq_len=256,
        batch_size=8,
        steps=1000,
        optimizer="muon",
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=80,
        eval_every=200,
        seed=0,
        extra={"quick_steps": 40},
    ),
    # A small code model on the standard library's source.
    "python-5m": TrainConfig(
        model=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
        data="python",
        vocab_size=4096,
        seq_len=256,
        batch_size=32,
        steps=1200,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=80,
        eval_every=200,
        seed=0,
        extra={"quick_steps": 30},
    ),
}

# stories-1m with BitNet b1.58 layers, trained from scratch (chapter 08): every linear layer's
# weights are {-1, 0, +1} times their row's mean magnitude, and its inputs int8, in every
# forward pass; the embedding and the output head stay in full precision, as in BitNet.
RECIPES["stories-1m-ternary"] = RECIPES["stories-1m"].replace(
    extra={
        "quick_steps": 60,
        "qat": {"fmt": "ternary", "bits": 2, "group_size": -1, "activation_bits": 8},
    },
)

# stories-1m given stories-8m's 20 minutes: compute-optimal for that budget (C ≈ 6·N·D with
# ~1.5e14 FLOPs gives N ≈ 1M, D ≈ 20M tokens). 16.4M tokens: 0.1769 bits/char on 300 held-out
# stories, +9.6% above the floor, stories_who/where/what all 1.0 (stories-8m: 0.2011, +25%).
# Timed alone (python -m benchmarks.train_speed --recipe stories-1m-20min): 17.0 minutes of
# training at 16.1k tok/s, 17.6 with the data, tokenizer and evaluation; the same 0.1769.
RECIPES["stories-1m-20min"] = RECIPES["stories-1m"].replace(
    steps=4000, data_size=150_000, eval_every=500
)


# stories-8m with superword tokens (chapter 02). Word-level merges run out on the grammar's few
# words at 672 tokens (3.9 characters a token, however large the vocabulary asked for); 1024
# tokens whose merges cross spaces ("In the end, ", "played with the ") average 9.9. The same
# model and 1000 Muon steps then read 2.6 times the text: 0.1760 bits/char, +9.0% above the
# floor (stories-8m: 0.2011, +25%), in the same ~20 minutes. 60,000 stories, so that the run
# still reads each story at most once, as stories-8m does its 30,000. Its story suites
# (python -m benchmarks.story_suites): stories_who 1.0, stories_what 0.925 (stories-8m: 0.29),
# but stories_where 0.25, chance (stories-8m: 0.515), also when every choice is scored inside
# a whole sentence. In the opening its tokenizer merges the place into "likedĠtoĠgoĠtoĠtheĠpark"
# (all twelve places), so copying it is not a lookup (chapter 02). stories_who_gen needs healing,
# since its prompt stops inside a superword: 0 without, 1.0 with (stories-8m: 1.0 either way).
RECIPES["stories-8m-superwords"] = RECIPES["stories-8m"].replace(superwords=True, data_size=60_000)


def quick_mode() -> bool:
    """Whether zoo recipes (and chapters that train) run their quick variants (SLMLAB_QUICK=1)."""
    return os.environ.get("SLMLAB_QUICK", "0") == "1"


def recipe(name: str, *, quick: bool | None = None) -> TrainConfig:
    """The recipe called `name` (its quick variant in quick mode)."""
    if name not in RECIPES:
        raise KeyError(f"no zoo recipe {name!r}; the zoo has {sorted(RECIPES)}")
    config = RECIPES[name]
    if quick_mode() if quick is None else quick:
        steps = config.extra["quick_steps"]
        config = config.replace(
            steps=steps,
            warmup_steps=min(config.warmup_steps, steps // 4),
            eval_every=steps,
            data_size=min(config.data_size, 4000),
        )
    return config


def path(name: str, *, quick: bool | None = None) -> Path:
    """Where the trained model of `name` is cached (whether or not it exists yet)."""
    config = recipe(name, quick=quick)
    return cache_dir() / "zoo" / f"{name}-{config.fingerprint()}"


def load(name: str, *, quick: bool | None = None, progress: bool = True):  # -> DecoderLM
    """The trained model of recipe `name`, training and caching it first if needed."""
    from ..checkpoint import load as load_checkpoint

    model = load_checkpoint(ensure(name, quick=quick, progress=progress))
    qat = recipe(name, quick=quick).extra.get("qat")
    if qat is not None:  # trained through rounding: hand out the quantized model it learnt to be
        from ..quant import QuantConfig
        from ..quant.qat import convert_qat_, prepare_qat_

        convert_qat_(prepare_qat_(model, QuantConfig(**qat)))
    return model


def ensure(name: str, *, quick: bool | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of `name`, trained now if it is not cached."""
    from ..train.loop import LAST, train

    run = path(name, quick=quick)
    if not (run / LAST / "trainer.json").is_file():
        train(recipe(name, quick=quick), run, progress=progress)
    return run / LAST
