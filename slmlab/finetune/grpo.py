"""Reinforcement learning with a verifiable reward (chapter 06): GRPO on the story questions.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) needs no value model and
no reward model, only a checker. Each step it asks `prompts` questions and samples a group of
`group` replies to each; a reply's reward is 1 if it is the answer the grammar knows (exact
match) and 0 if not. A reply's advantage is its reward standardized within its group
(`group_advantages`): a right answer among wrong ones is pushed up hard, a group all right or
all wrong teaches nothing. The loss (`grpo_loss`) is PPO's clipped surrogate for every token of
a reply, averaged over the reply's tokens and then over the replies, plus β times an estimate
of the KL divergence to the starting model, the reference: ``exp(r - p) - (r - p) - 1`` per
token, with p and r the two models' log-probabilities (Schulman's k3, never negative).

Here one gradient step is taken per sampled batch (TRL's default too), so the model that
sampled is the one being updated: the probability ratio is 1 and its clipping never binds,
though its gradient is the policy gradient. They are kept so that the loss is the paper's.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load, load_chat_settings, load_tokenizer
from ..data.chat import IGNORE
from ..data.story_qa import QUESTION_KINDS, QAExample, qa_examples, score_answers
from ..eval.story_qa import answer_questions
from ..infer.generate import generate
from ..templates import render_chat
from ..tokenizers import as_hf_tokenizer
from ..train.data import Batch
from ..train.preference import token_logps
from ..train.state import save_run

__all__ = ["GRPOConfig", "group_advantages", "grpo", "grpo_loss"]


@dataclass(frozen=True)
class GRPOConfig:
    """A GRPO run: `steps` of `prompts` training questions, `group` replies sampled for each at
    `temperature` (up to `max_new_tokens`), AdamW at `lr`, KL weight `beta`, ratio clip `clip`;
    `examples` training questions of `kinds` to cycle through (a reward teaches only where
    the model is sometimes right, so a run may ask those kinds alone), `eval_questions`
    held-out validation questions of every kind answered greedily (replies of up to
    `max_new_tokens`) every `eval_every` steps."""

    steps: int = 60
    prompts: int = 8
    group: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 16
    lr: float = 2e-5
    beta: float = 0.04
    clip: float = 0.2
    examples: int = 2000
    eval_questions: int = 100
    eval_every: int = 20
    seed: int = 0
    kinds: tuple[str, ...] = QUESTION_KINDS

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "group", "max_new_tokens", "examples", "eval_questions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"grpo {name} must be a positive integer, got {value!r}")
        if self.group < 2:
            raise ValueError(
                f"grpo group must be 2 or more (advantages compare replies), got {self.group}"
            )
        for name in ("temperature", "lr", "beta", "clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"grpo {name} must be a number of 0 or more, got {value!r}")
        if self.temperature == 0 or self.lr == 0:
            raise ValueError("grpo samples (temperature > 0) and learns (lr > 0)")
        unknown = [k for k in self.kinds if k not in QUESTION_KINDS]
        if unknown or not self.kinds:
            raise ValueError(
                f"grpo kinds must be some of {list(QUESTION_KINDS)}, got {list(self.kinds)!r}"
            )
        object.__setattr__(self, "kinds", tuple(self.kinds))  # a list from JSON or TOML


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(prompts, group) rewards → advantages: each reward less its group's mean, over its
    group's standard deviation (the unbiased one, as TRL computes it) plus `eps`."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's loss for replies (B, T) of per-token log-probabilities under the model, the model
    that sampled them and the reference, each reply's advantage (B,) and the mask of its tokens;
    and the mean per-token KL estimate (for the record)."""
    ratio = torch.exp(logps - old_logps)
    surrogate = torch.minimum(
        ratio * advantages[:, None], ratio.clamp(1 - clip, 1 + clip) * advantages[:, None]
    )
    log_ratio = reference_logps - logps
    kl = torch.exp(log_ratio) - log_ratio - 1
    per_token = -(surrogate - beta * kl)
    tokens = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / tokens).mean()
    return loss, ((kl * mask).sum(1) / tokens).mean().detach()


def _rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad: int) -> Batch:
    """Prompt + reply rows, right-padded with `pad`, learning the reply's tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, replies, strict=True))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    targets = torch.full((len(prompts), width - 1), IGNORE, dtype=torch.long)
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        ids[i, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        targets[i, len(prompt) - 1 : len(prompt) + len(reply) - 1] = torch.tensor(reply)
    return Batch(ids, targets)


def grpo(
    base: str | Path,
    out: str | Path,
    config: GRPOConfig = GRPOConfig(),
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train chat checkpoint `base` (an SFT model: GRPO sharpens what it can sometimes do) with
    GRPO on story questions into ``out/last``; metrics go to ``out/metrics.jsonl``. Returns the
    held-out exact match before and after, and the run's minutes."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    model, reference = load(base), load(base)
    reference.requires_grad_(False)
    model.train()
    tokenizer = load_tokenizer(base)
    settings = {k: v for k, v in load_chat_settings(base).items() if v is not None}
    if not settings.get("chat_template"):
        raise ValueError(f"{base}: GRPO trains a chat model; fine-tune it to chat (SFT) first")
    fast = as_hf_tokenizer(tokenizer)
    special = {k: v for k, v in settings.items() if k.endswith("_token")}
    end = fast.token_to_id(settings.get("eos_token") or "")
    room = model.config.max_position_embeddings - config.max_new_tokens

    def prompt_ids(example: QAExample) -> list[int]:
        text = render_chat(
            settings["chat_template"], example.messages(with_answer=False), **special
        )
        return fast.encode(text, add_special_tokens=False).ids

    def fits(example: QAExample) -> bool:
        return len(prompt_ids(example)) <= room

    questions = qa_examples(config.examples, "train", kinds=config.kinds, keep=fits)
    held_out = qa_examples(config.eval_questions, "validation", keep=fits)
    order = list(range(len(questions)))
    random.Random(config.seed).shuffle(order)

    def evaluate() -> float:
        model.eval()
        replies = answer_questions(
            model, tokenizer, settings, held_out, max_new_tokens=config.max_new_tokens
        )
        model.train()
        return score_answers(held_out, replies)["exact_match"]

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    start_accuracy = evaluate()
    with metrics_path.open("a") as f:
        f.write(json.dumps({"step": 0, "val_exact_match": start_accuracy}) + "\n")
    started = time.perf_counter()
    accuracy = start_accuracy
    for step in tqdm(range(config.steps), desc="grpo", disable=not progress):
        first = step * config.prompts
        asked = [questions[order[(first + i) % len(order)]] for i in range(config.prompts)]
        prompts = [prompt_ids(e) for e in asked for _ in range(config.group)]
        model.eval()
        with torch.no_grad():
            sampled = generate(
                model, prompts, config.max_new_tokens, temperature=config.temperature,
                seed=config.seed * 1_000_003 + step, stop_tokens=[end],
            )  # fmt: skip
        model.train()
        replies = [ids[len(p) :] for p, ids in zip(prompts, sampled, strict=True)]
        texts = [fast.decode(r, skip_special_tokens=True) for r in replies]
        examples = [e for e in asked for _ in range(config.group)]
        rewards = torch.tensor(
            [score_answers([e], [t])["exact_match"] for e, t in zip(examples, texts, strict=True)]
        ).view(config.prompts, config.group)
        advantages = group_advantages(rewards).flatten()
        rows = _rows(prompts, [r or [end] for r in replies], end)
        logps, mask = token_logps(model, rows)
        with torch.no_grad():
            reference_logps, _ = token_logps(reference, rows)
        loss, kl = grpo_loss(
            logps, logps.detach(), reference_logps, advantages, mask.float(),
            clip=config.clip, beta=config.beta,
        )  # fmt: skip
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": loss.item(),
            "reward": rewards.mean().item(),
            "kl": kl.item(),
            "grad_norm": grad_norm.item(),
        }
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            accuracy = record["val_exact_match"] = evaluate()
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    minutes = (time.perf_counter() - started) / 60
    trainer = {"step": config.steps, "grpo": asdict(config), "init_from": str(base)}
    save_run(model, optimizer, out, tokenizer, trainer, rank=0, chat=settings)
    return {"val_exact_match": (start_accuracy, accuracy), "minutes": minutes}
