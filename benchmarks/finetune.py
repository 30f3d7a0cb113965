"""Fine-tuning (chapter 06): what SFT and LoRA teach stories-8m, and what a LoRA step costs.

    python -m benchmarks.finetune [--parts quality,speed,memory] [--steps 20]

A run of some parts keeps the other parts' results from the last run that measured them.

Results go to benchmarks/results/finetune.json (``--results NAME``: NAME.json, for a run on
another machine kept beside it: finetune_epyc.json is the ``longer`` part on an AMD EPYC).

* Quality: exact match and hallucination rate on 200 held-out story questions (test split),
  for stories-8m before fine-tuning (its weights with the chat tokens added, step 0), the zoo's
  stories-8m-sft (every weight) and stories-8m-lora (rank 16), each trained if not cached.
  Goal (the fine-tuning issue): SFT ≥ 0.9 exact match.
* The other methods (``methods``), trained here with their settings below and scored on the
  same questions: QLoRA (stories-8m-lora's recipe over an NF4 base), and DPO, SimPO and ORPO
  from stories-8m-sft on story-qa preference pairs (the story's answer against a made-up one),
  with each one's validation pair accuracy (the share of held-out pairs it ranks right).
* A longer SFT (``longer``): stories-8m-sft's recipe for 4 times the steps on 4 times the
  conversations, scored the same way: whether the recall SFT lacks comes with more of it; then
  (``sft-targeted``) the kind it still fails taught on its own, the embedding held still
  (`TARGETED_RUNS`).
* GRPO (``grpo``) from stories-8m-sft with `GRPO_RUN`, reward = exact match, scored the same
  way; its held-out validation exact match before and after is recorded too. The ``longer``
  part runs the same GRPO from the longer SFT as well (``grpo-after-longer``), and GRPO
  asking only the kinds the longer SFT answers right sometimes but not nearly always, on 200
  held-out validation questions (`GRPO_SHARPEN`; ``grpo-sharpened``). Goal: GRPO above the
  SFT model it starts from.
* Speed and memory: one LoRA training step (rank 16 on every block's linear layers, AdamW,
  16 rows of 256 tokens, replies-only loss) of slmlab against PEFT on transformers' Llama, the
  same weights, rows and settings, each side in a fresh process; memory is the peak resident
  memory from loading the model to the last step, above what the process held before it (the
  libraries imported); the baseline is PEFT's, measured in the same run. Goal: ≥ 1.5× faster, at most the same memory.
* The real model (``real``): SmolLM2-135M-Instruct before and after the zoo's
  smollm2-135m-story-lora (rank 8, 30 steps of 4 rows) on the same 200 questions, replies cut at
  16 tokens; and the LoRA step of both libraries on its first 4 rows (rank 16), where the output
  head has 49,152 rows and slmlab runs it at the reply tokens alone. Same goal as above.
* LoRA's rank (``ranks``): the real model's recipe (smollm2-135m-story-lora) at each rank of
  `LORA_RANKS`, alpha twice the rank as in the recipe, scored on the same questions: what a
  larger update buys, against the weights it trains.
* QLoRA's memory (``memory``): on the real model (SmolLM2-135M, 4 rows of 256 tokens whose
  last 32 are learnt, as a reply is; AdamW), for full fine-tuning, LoRA on the fp32 base and
  QLoRA (LoRA on the NF4 base), each in a fresh process, with every block's activations kept
  and with them recomputed in the backward pass (``activation_checkpointing``): the bytes of
  the prepared model's tensors (weights, codes, the update), the resident memory the prepared
  model adds, and the peak while training steps run, both above the process's memory before
  the model was loaded; the baseline is LoRA's, measured in the same run. Also QLoRA with the
  embedding (tied to the head) in int8 rows too (``qlora-int8-embedding``), which QLoRA's
  recipe leaves in fp32; and LoRA and QLoRA (int8 embedding, the loss's head in chunks) under
  bf16 autocast with the hidden state between blocks in bf16 (``-bf16-residual``: QLoRA's
  compute type). Goal: QLoRA's training peak ≤ 0.4× LoRA's in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, write
from slmlab import checkpoint, zoo
from slmlab.data.story_qa import QUESTION_KINDS, qa_examples, score_answers
from slmlab.eval.story_qa import answer_questions
from slmlab.finetune import finetune
from slmlab.layers.lora import LoraConfig, apply_lora_

RANK, ROWS = 16, 16
PARTS = ("quality", "methods", "grpo", "speed", "memory", "real", "longer", "ranks")
# GRPO from stories-8m-sft: 40 steps of 8 questions, 4 sampled replies each.
GRPO_RUN = {"steps": 40, "prompts": 8, "group": 4, "max_new_tokens": 12, "lr": 1e-4,
            "eval_every": 20}  # fmt: skip
# Preference tuning from stories-8m-sft: 100 steps of 16 pairs, one pass over 1,600 pairs.
PREFERENCE = {
    "dpo": {"lr": 5e-5},
    "simpo": {"lr": 5e-5},
    "orpo": {"lr": 2e-4},
}
PREFERENCE_RUN = {"steps": 100, "examples": 1600, "batch_size": 16}


def _quality(work: Path) -> dict:
    base = zoo.ensure("stories-8m")
    start = finetune(base, work / "step0", max_steps=0, progress=False).checkpoint
    runs = {
        "stories-8m (step 0)": start,
        "stories-8m-sft": zoo.ensure("stories-8m-sft"),
        "stories-8m-lora": zoo.ensure("stories-8m-lora"),
    }
    test = _test_questions(checkpoint.load_tokenizer(start))
    out = {}
    for name, path in runs.items():
        out[name] = _score(path, test)
        print(f"{name:22} exact match {out[name]['exact_match']:.3f}  "
              f"hallucination {out[name]['hallucination']:.3f}")  # fmt: skip
    return out


def _test_questions(tokenizer, split: str = "test") -> list:
    """200 questions of `split` whose prompts leave room for the reply in 256 tokens."""
    return qa_examples(200, split, keep=lambda e: len(tokenizer.encode(e.prompt()).ids) < 224)


def _score(path: Path, test: list, **options) -> dict:
    model = checkpoint.load(path)
    settings = checkpoint.load_chat_settings(path)
    return score_answers(
        test, answer_questions(model, checkpoint.load_tokenizer(path), settings, test, **options)
    )


def _methods(work: Path) -> dict:
    """QLoRA, DPO, SimPO and ORPO trained and scored; each with its settings and minutes, and
    the SFT model the preference methods start from (``sft``), scored in the same run."""
    from slmlab.finetune import finetune_config, train_finetune

    sft = zoo.ensure("stories-8m-sft")
    test = _test_questions(checkpoint.load_tokenizer(sft))
    lora = zoo.recipe("stories-8m-lora")
    runs = {
        "qlora": finetune_config(
            zoo.ensure("stories-8m"), method="qlora", rank=16, steps=lora.steps,
            examples=lora.data_size, lr=lora.lr, batch_size=lora.batch_size,
        ).replace(min_lr=lora.min_lr),
        **{
            method: finetune_config(sft, method=method, **PREFERENCE_RUN, **settings)
            for method, settings in PREFERENCE.items()
        },
    }  # fmt: skip
    out = {"sft": _score(sft, test)}
    for method, config in runs.items():
        started = time.perf_counter()
        result = train_finetune(config, work / method, progress=False)
        minutes = (time.perf_counter() - started) / 60
        out[method] = {**_score(result.checkpoint, test), "minutes": minutes,
                       "lr": config.lr, "steps": config.steps}  # fmt: skip
        metrics = [json.loads(line) for line in (work / method / "metrics.jsonl").open()]
        accuracy = [m["val_pair_accuracy"] for m in metrics if "val_pair_accuracy" in m]
        if accuracy:
            out[method]["val_pair_accuracy"] = accuracy[-1]
        print(f"{method:6} exact match {out[method]['exact_match']:.3f}  "
              f"hallucination {out[method]['hallucination']:.3f}  ({minutes:.1f} min)")  # fmt: skip
    return out


LONGER = 4  # the longer SFT run: stories-8m-sft's recipe for 4 times the steps, on fresh data


def _longer(work: Path) -> dict:
    """stories-8m-sft's recipe run `LONGER` times as long on as many more conversations (none
    seen twice): does more of the same fine-tuning bring the recall it lacks?"""
    from slmlab.finetune import train_finetune

    recipe = zoo.resolve(zoo.recipe("stories-8m-sft"))
    config = recipe.replace(steps=LONGER * recipe.steps, data_size=LONGER * recipe.data_size,
                            eval_every=LONGER * recipe.eval_every)  # fmt: skip
    started = time.perf_counter()
    result = train_finetune(config, work / "sft-longer", progress=False)
    minutes = (time.perf_counter() - started) / 60
    test = _test_questions(checkpoint.load_tokenizer(result.checkpoint))
    scores = {**_score(result.checkpoint, test), "steps": config.steps,
              "conversations": config.data_size, "minutes": minutes,
              "embedding_lr_scale": config.embedding_lr_scale}  # fmt: skip
    print(
        f"sft x{LONGER}: exact match {scores['exact_match']:.3f}  "
        f"hallucination {scores['hallucination']:.3f}  ({minutes:.1f} min)"
    )
    return scores


# After the longer SFT, the one kind it still answers at chance (the weather: stories-8m's
# pre-training never copies those words, and SFT pulls their rows of the tied embedding
# together) is taught on its own: conversations that ask it first and three other kinds after,
# on fresh training stories, with the embedding held all but still (its rate a millionth of the
# rest's), so that the model learns to copy the word instead of blurring the table further. Two
# runs of (steps, story batch), scored after each.
TARGETED_KIND = "weather"
TARGETED_RUNS = ((200, 5), (400, 7))
TARGETED_TOKENS = 225  # a conversation's words (and 8 tokens a turn for the template) at most


def _targeted_conversations(path: Path, tokenizer, batch: int) -> None:
    """Conversations about 6,000 training stories (`batch` of the split's story sequence),
    `TARGETED_KIND` asked first, written to `path` as the reader's own jsonl would be."""
    import random

    from slmlab.data.story_grammar import stories
    from slmlab.data.story_qa import QUESTION_KINDS, SPLIT_SEEDS, question_about

    rng = random.Random(0)
    others = [kind for kind in QUESTION_KINDS if kind != TARGETED_KIND]
    with path.open("w") as f:
        for story in stories(6000, seed=SPLIT_SEEDS["train"] + 1000 * batch):
            asked = [question_about(story, k) for k in [TARGETED_KIND, *rng.sample(others, 3)]]
            turns = asked[0].messages()
            for example in asked[1:]:
                turns += [{"role": "user", "content": example.question},
                          {"role": "assistant", "content": example.answer}]  # fmt: skip
            while turns and sum(len(tokenizer.encode(t["content"]).ids) + 8 for t in turns) > (
                TARGETED_TOKENS
            ):
                turns = turns[:-2]
            if turns:
                f.write(json.dumps({"messages": turns}) + "\n")


def _targeted(work: Path, start: Path) -> dict:
    """`TARGETED_RUNS` from checkpoint `start` (the longer SFT), each scored on the test
    questions; the last is ``sft-targeted``."""
    test = _test_questions(checkpoint.load_tokenizer(start))
    runs = []
    for i, (steps, batch) in enumerate(TARGETED_RUNS):
        data = work / f"targeted-{i}.jsonl"
        _targeted_conversations(data, checkpoint.load_tokenizer(start), batch)
        started = time.perf_counter()
        result = finetune(start, work / f"sft-targeted-{i}", data=str(data), examples=6000,
                          steps=steps, lr=5e-4, embedding_lr_scale=1e-6, progress=False)  # fmt: skip
        start = result.checkpoint
        runs.append({**_score(start, test), "steps": steps, "story_batch": batch,
                     "minutes": (time.perf_counter() - started) / 60})  # fmt: skip
        print(f"targeted run {i} ({steps} steps): exact match {runs[-1]['exact_match']:.3f}, "
              f"{TARGETED_KIND} {runs[-1]['exact_match/' + TARGETED_KIND]:.3f}")  # fmt: skip
    return {**runs[-1], "kind": TARGETED_KIND, "lr": 5e-4, "embedding_lr_scale": 1e-6,
            "runs": runs}  # fmt: skip


# GRPO where the model is sometimes right: from the longer SFT, asking only the kinds it
# answers right on at least `SHARPEN_BETWEEN[0]` and under `SHARPEN_BETWEEN[1]` of 200 held-out
# validation questions (a kind always right or never right makes groups whose rewards are all
# alike, and no advantage), in groups of 8, for 60 steps.
SHARPEN_BETWEEN = (0.3, 0.9)
GRPO_SHARPEN = {"steps": 60, "prompts": 8, "group": 8, "max_new_tokens": 12, "lr": 1e-4,
                "eval_every": 20}  # fmt: skip


def _sharpened(work: Path, start: Path) -> dict:
    """GRPO (`GRPO_SHARPEN`) from checkpoint `start` on the kinds it is unsure of
    (`SHARPEN_BETWEEN`, judged on validation questions), scored on the test questions; or,
    where it is unsure of none, the kinds it was judged on and no run."""
    judged = _score(start, _test_questions(checkpoint.load_tokenizer(start), "validation"))
    low, high = SHARPEN_BETWEEN
    kinds = [k for k in QUESTION_KINDS if low <= judged[f"exact_match/{k}"] < high]
    chosen = {"validation": judged, "kinds": kinds}
    print(f"unsure of {kinds or 'no kind'} on validation questions")
    if not kinds:
        return chosen
    return {**_grpo(work, start, "grpo-sharpened", {**GRPO_SHARPEN, "kinds": tuple(kinds)}),
            **chosen}  # fmt: skip


REAL_ROWS = 4  # SmolLM2-135M's LoRA step: 4 rows of 256 tokens


def _real(work: Path, steps: int) -> dict:
    """The real model before and after the zoo's 30 LoRA steps on the 200 test questions
    (replies cut at 16 tokens, as in the chapter), and its LoRA step against PEFT's."""
    test = _test_questions(checkpoint.load_tokenizer(zoo.ensure("stories-8m-sft")))
    runs = {
        "smollm2-135m-instruct": zoo.ensure("smollm2-135m-instruct"),
        "smollm2-135m-story-lora": zoo.ensure("smollm2-135m-story-lora"),
    }
    story_qa = {}
    for name, path in runs.items():
        started = time.perf_counter()
        story_qa[name] = {**_score(path, test, max_new_tokens=16),
                          "answer_seconds": time.perf_counter() - started}  # fmt: skip
        print(f"{name:24} exact match {story_qa[name]['exact_match']:.3f}  "
              f"hallucination {story_qa[name]['hallucination']:.3f}")  # fmt: skip
    return {
        "story_qa": story_qa,
        "lora_step": _speed(work, steps, "smollm2-135m-story-lora", REAL_ROWS),
    }


LORA_RANKS = (1, 2, 4, 8, 16, 32)


def _ranks(work: Path) -> dict:
    """smollm2-135m-story-lora's recipe at each rank of `LORA_RANKS` (alpha twice the rank),
    trained here: its trained weights, minutes, and exact match and hallucination on the
    questions of `_real`."""
    from slmlab.finetune import train_finetune

    recipe = zoo.resolve(zoo.recipe("smollm2-135m-story-lora"))
    assert recipe.lora is not None
    test = _test_questions(checkpoint.load_tokenizer(zoo.ensure("stories-8m-sft")))
    out = {}
    for rank in LORA_RANKS:
        config = recipe.replace(lora={**recipe.lora, "r": rank, "alpha": 2 * rank})
        started = time.perf_counter()
        result = train_finetune(config, work / f"rank-{rank}", progress=False)
        minutes = (time.perf_counter() - started) / 60
        model = checkpoint.load(result.checkpoint)
        trained = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        out[str(rank)] = {**_score(result.checkpoint, test, max_new_tokens=16),
                          "trained_weights": trained, "minutes": minutes}  # fmt: skip
        print(f"rank {rank:2}  {trained:9,} weights  exact match {out[str(rank)]['exact_match']:.3f}"
              f"  hallucination {out[str(rank)]['hallucination']:.3f}  ({minutes:.1f} min)")  # fmt: skip
    return out


def _grpo(
    work: Path, start: Path | None = None, name: str = "grpo", settings: dict | None = None
) -> dict:
    """GRPO with `settings` (`GRPO_RUN` by default) from checkpoint `start` (the zoo's
    stories-8m-sft by default) into ``work / name``, scored on the test questions."""
    from slmlab.finetune.grpo import GRPOConfig, grpo

    settings = settings or GRPO_RUN
    start = start or zoo.ensure("stories-8m-sft")
    test = _test_questions(checkpoint.load_tokenizer(start))
    run = grpo(start, work / name, GRPOConfig(**settings), progress=False)
    scores = _score(work / name / "last", test)
    metrics = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
    rewards = [m["reward"] for m in metrics if "reward" in m]
    print(f"{name}   exact match {scores['exact_match']:.3f}  ({run['minutes']:.1f} min)")
    return {**scores, **settings, "minutes": run["minutes"],
            "val_exact_match_before_after": run["val_exact_match"],
            "rewards": rewards}  # fmt: skip


def _rows(work: Path, name: str, rows: int) -> tuple[Path, Path]:
    """The first `rows` rows of zoo recipe `name`'s data, and its base (with the chat tokens)
    saved where transformers reads it."""
    from slmlab.train import build_data

    config = zoo.resolve(zoo.recipe(name))
    data = build_data(config)
    start = finetune(config.init_from, work / f"{name}-step0", max_steps=0, examples=rows,
                     progress=False)  # fmt: skip
    batch = data.batch(0, rows, 0)
    torch.save({"ids": batch.ids, "targets": batch.targets}, work / f"{name}-rows.pt")
    return start.checkpoint, work / f"{name}-rows.pt"


def _side(side: str, base: Path, rows: Path, steps: int) -> None:
    """One side's step time and memory, printed as JSON (run in its own process)."""
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    batch = torch.load(rows)
    ids, targets = batch["ids"], batch["targets"]
    if side == "peft":  # imported before memory is measured: the libraries are not the run
        import peft  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    with _PeakRSS() as peak:
        before = _PeakRSS.now()
        first, times, trainable = _lora_steps(side, base, ids, targets, steps)
    times.sort()
    print(json.dumps({
        "first_loss": first,
        "step_seconds": times[len(times) // 2],
        "trainable": trainable,
        "peak_mib": peak.peak - before,
    }))  # fmt: skip


def _lora_steps(side: str, base: Path, ids, targets, steps: int) -> tuple[float, list, int]:
    """Build `side`'s LoRA model and take 1 + `steps` steps: the first loss, the timed steps'
    seconds and the number of trained weights."""
    if side == "slmlab":
        from slmlab.train import next_token_loss
        from slmlab.train.data import Batch

        model = checkpoint.load(base)
        apply_lora_(model, LoraConfig(r=RANK, alpha=2 * RANK))
        model.train()
        rows_batch = Batch(ids, targets)

        def loss() -> torch.Tensor:
            return next_token_loss(model, rows_batch)
    else:
        import peft
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        settings = peft.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )  # fmt: skip
        model = peft.get_peft_model(hf, settings)
        model.train()
        labels = torch.cat([targets, torch.full_like(targets[:, :1], -100)], 1)
        labels = torch.roll(labels, 1, 1)  # transformers shifts labels itself

        def loss() -> torch.Tensor:
            return model(input_ids=ids[:, :-1], labels=labels[:, :-1]).loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    first = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, times, sum(p.numel() for p in params)


SPEED_ROUNDS = 3
MEMORY_ROWS, MEMORY_LEN, MEMORY_REPLY = 4, 256, 32
# QLoRA as the recipe has it (the embedding, tied to the head, in fp32), and with the embedding
# in int8 rows as well (`QuantConfig.embedding_bits`): a fifth of SmolLM2-135M's weights.
MEMORY_METHODS = ("full", "lora", "qlora", "qlora-int8-embedding")
# The same with the loss's head over `HEAD_CHUNK` learnt positions at a time
# (`TrainConfig.head_chunk`): the logits of the 128 learnt positions are then never all kept.
HEAD_CHUNK = 32
CHUNKED = "-head-chunks"
# And both of those under bf16 autocast with the hidden state between blocks in bf16
# (`TrainConfig.precision` ``bf16-residual``): QLoRA's compute type (Dettmers et al., 2023).
BF16 = "-bf16-residual"
CHUNKED_RUNS = ("lora" + CHUNKED, "qlora-int8-embedding" + CHUNKED)
MEMORY_RUNS = (*MEMORY_METHODS, *CHUNKED_RUNS, *(run + BF16 for run in CHUNKED_RUNS))


class _PeakRSS:
    """The process's largest resident memory (MiB) while inside the block, sampled every 5 ms
    from /proc (Linux). ``ru_maxrss`` cannot be reset, and a child process starts with its
    parent's, so it cannot time one phase of a run."""

    def __init__(self) -> None:
        self.peak = 0.0

    @staticmethod
    def now() -> float:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20

    def __enter__(self) -> _PeakRSS:
        import threading

        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self.now())

        self.peak = self.now()
        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def _memory_side(method: str, base: Path, steps: int, checkpointed: bool) -> None:
    """Resident memory and step time of `method` (`MEMORY_RUNS`) on checkpoint `base`,
    printed as JSON: the model as it trains (weights, and codes for QLoRA), and the peak while
    training steps run (adding activations, gradients and AdamW's state)."""
    import gc

    from slmlab.data.chat import IGNORE
    from slmlab.finetune import finetune_config, round_base_
    from slmlab.train import next_token_loss, set_precision
    from slmlab.train.data import Batch

    bf16_residual = method.endswith(BF16)
    method = method.removesuffix(BF16)
    head_chunk = HEAD_CHUNK if method.endswith(CHUNKED) else 0
    method = method.removesuffix(CHUNKED)
    torch.manual_seed(0)
    before = _PeakRSS.now()
    model = checkpoint.load(base)
    if method != "full":
        config = finetune_config(base, method=method.split("-")[0], rank=RANK)
        if method == "qlora-int8-embedding":
            config = config.replace(quantize_base={**config.quantize_base, "embedding_bits": 8})
        apply_lora_(model, config.lora_config())
        if config.quantize_base is not None:
            round_base_(model, config)
    gc.collect()
    model.train()
    model.activation_checkpointing = checkpointed
    precision = "bf16-residual" if bf16_residual else "fp32"
    autocast = set_precision(model, precision, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (MEMORY_ROWS, MEMORY_LEN + 1))
    targets = ids[:, 1:].clone()
    targets[:, :-MEMORY_REPLY] = IGNORE  # the reply alone is learnt
    rows = Batch(ids, targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    prepared = _PeakRSS.now()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}  # fmt: skip
    times = []
    with _PeakRSS() as training:
        for _ in range(steps):
            t0 = time.perf_counter()
            next_token_loss(model, rows, autocast, head_chunk).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    print(json.dumps({
        "trainable": sum(p.numel() for p in params),
        "step_seconds": sorted(times)[len(times) // 2],
        "weights_mib": sum(storages.values()) / 2**20,
        "model_mib": prepared - before,
        "training_peak_mib": training.peak - before,
    }))  # fmt: skip


def _memory(steps: int) -> dict:
    base = zoo.ensure("smollm2-135m-instruct")
    runs: dict[bool, dict] = {}
    for checkpointed in (False, True):
        sides = runs[checkpointed] = {}
        for method in MEMORY_RUNS:
            command = [sys.executable, "-m", "benchmarks.finetune", "--memory-side", method,
                       "--base", str(base), "--steps", str(steps)]  # fmt: skip
            if checkpointed:
                command.append("--checkpointed")
            # glibc keeps freed blocks of a few MiB for reuse unless told to map them
            # separately: then the fp32 weights QLoRA rounds away leave the resident memory,
            # as they leave use.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            sides[method] = json.loads(done.stdout.strip().splitlines()[-1])
            print(method, "checkpointed" if checkpointed else "", sides[method], flush=True)

    def ratio(sides: dict, field: str, method: str = "qlora") -> float:
        return sides[method][field] / sides["lora"][field]

    def chunked(sides: dict, qlora_suffix: str, lora_suffix: str | None = None) -> float:
        """QLoRA's (int8 embedding, head in chunks) training peak over LoRA's (head in
        chunks), each side named with its suffix (`BF16` or none; LoRA's QLoRA's unless
        given)."""
        lora_suffix = qlora_suffix if lora_suffix is None else lora_suffix
        qlora, lora = sides[CHUNKED_RUNS[1] + qlora_suffix], sides[CHUNKED_RUNS[0] + lora_suffix]
        return qlora["training_peak_mib"] / lora["training_peak_mib"]

    plain, recomputed = runs[False], runs[True]
    return {
        "model": "smollm2-135m-instruct",
        "rows": MEMORY_ROWS,
        "seq_len": MEMORY_LEN,
        "learnt_per_row": MEMORY_REPLY,
        "rank": RANK,
        "baseline": "lora",
        **plain,
        "checkpointed": recomputed,
        "qlora_to_lora": ratio(plain, "training_peak_mib"),
        "qlora_to_lora_checkpointed": ratio(recomputed, "training_peak_mib"),
        "qlora_to_lora_model": ratio(plain, "model_mib"),
        "qlora_to_lora_weights": ratio(plain, "weights_mib"),
        "qlora_int8_embedding_to_lora_checkpointed": ratio(
            recomputed, "training_peak_mib", "qlora-int8-embedding"
        ),
        "head_chunk": HEAD_CHUNK,
        "head_chunks_qlora_int8_embedding_to_lora_checkpointed": chunked(recomputed, ""),
        # QLoRA's compute type against LoRA in fp32 (the goal's comparison), and against LoRA
        # with the same bf16 stream
        "bf16_residual_qlora_to_lora_checkpointed": chunked(recomputed, BF16, ""),
        "bf16_residual_qlora_to_lora_bf16_residual_checkpointed": chunked(recomputed, BF16),
        "goal": {"qlora_to_lora": 0.4},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed LoRA steps a side")
    parser.add_argument(
        "--results", default="finetune",
        help="the results' name in benchmarks/results (another machine's run kept beside)",
    )  # fmt: skip
    parser.add_argument("--side", choices=["slmlab", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--memory-side", choices=MEMORY_RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _side(args.side, args.base, args.rows, args.steps)
        return
    if args.memory_side:
        _memory_side(args.memory_side, args.base, min(args.steps, 3), args.checkpointed)
        return
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part {unknown[0]!r}; choose from {','.join(PARTS)}")
    work = Path(tempfile.mkdtemp(prefix="slmlab-finetune-"))
    kept = RESULTS / f"{args.results}.json"
    result: dict = json.loads(kept.read_text()) if kept.exists() else {}
    result = {k: v for k, v in result.items() if k not in ("benchmark", "machine")}
    if "quality" in parts:
        result["story_qa"] = _quality(work)
    if "methods" in parts:
        result["methods"] = {**result.get("methods", {}), **_methods(work)}
    if "grpo" in parts:
        result["methods"] = {**result.get("methods", {}), "grpo": _grpo(work)}
    if "memory" in parts:
        result["qlora_memory"] = _memory(args.steps)
    if "speed" in parts:
        result["lora_step"] = _speed(work, args.steps)
    if "longer" in parts:
        longer = _longer(work)
        after = _grpo(work, work / "sft-longer" / "last", "grpo-after-longer")
        sharpened = _sharpened(work, work / "sft-longer" / "last")
        targeted = _targeted(work, work / "sft-longer" / "last")
        result["methods"] = {**result.get("methods", {}), "sft-longer": longer,
                             "grpo-after-longer": after, "grpo-sharpened": sharpened,
                             "sft-targeted": targeted}  # fmt: skip
    if "real" in parts:
        result["real_model"] = _real(work, min(args.steps, 5))
    if "ranks" in parts:
        result["lora_ranks"] = _ranks(work)
    print(write(args.results, result))


def _speed(
    work: Path,
    steps: int,
    name: str = "stories-8m-lora",
    rows: int = ROWS,
    rounds: int = SPEED_ROUNDS,
) -> dict:
    """slmlab's LoRA step against PEFT's on zoo recipe `name`'s first `rows` rows: `rounds`
    rounds of the two sides in turn, each side in a fresh process (its memory its own). The
    speedup is the median of the rounds' ratios: a shared machine's speed drifts over minutes,
    and two sides timed minutes apart would carry that drift into their ratio."""
    base, batch = _rows(work, name, rows)
    runs: dict[str, list[dict]] = {"peft": [], "slmlab": []}
    for _ in range(rounds):
        for side, kept in runs.items():
            command = [sys.executable, "-m", "benchmarks.finetune", "--side", side, "--base",
                       str(base), "--rows", str(batch), "--steps", str(steps)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            kept.append(json.loads(out.strip().splitlines()[-1]))
            print(side, kept[-1])
    median = statistics.median
    sides = {
        side: {**kept[0], **{field: median(run[field] for run in kept)
                             for field in ("step_seconds", "peak_mib")}}
        for side, kept in runs.items()
    }  # fmt: skip
    rounds_seconds = [{"peft": p["step_seconds"], "slmlab": s["step_seconds"]}
                      for p, s in zip(runs["peft"], runs["slmlab"], strict=True)]  # fmt: skip
    ratios = [r["peft"] / r["slmlab"] for r in rounds_seconds]
    return {
        "data": f"{name}'s first rows",
        "rank": RANK,
        "rows": rows,
        "seq_len": 256,
        "baseline": "peft",
        **sides,
        "rounds": rounds_seconds,
        "speedup": median(ratios),
        "speedup_range": [min(ratios), max(ratios)],
        "memory_ratio": sides["slmlab"]["peak_mib"] / sides["peft"]["peak_mib"],
        "goal": {"speedup": 1.5, "memory_ratio": 1.0},
    }


if __name__ == "__main__":
    main()
