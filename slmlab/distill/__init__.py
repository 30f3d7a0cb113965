"""Knowledge distillation (chapter 07): a small student taught by a larger teacher.

Three ways for the teacher's knowledge to reach the student:

* **logits** (`train_distill`, a training config with a ``[distill]`` table): at every
  position of the training text the student learns the teacher's whole next-token
  distribution, not just the one token the text has (`slmlab.distill.losses`: forward or
  reverse KL, generalised JSD, total variation, mixed with the data's cross-entropy). Teacher
  and student share a tokenizer: the student reads the data in the teacher's tokens.
* **sequences** (`teacher_texts`): the teacher writes texts and the student is pre-trained on
  them (Kim and Rush's sequence-level KD). It needs nothing of the teacher but its text, so it
  works between any two tokenizers, and it makes data where there is little.

The run is a training run of `slmlab.train` (checkpoints, exact resume, metrics), whose
validation loss is the student's own cross-entropy on the data, comparable with a student
trained from scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load, load_tokenizer
from ..models.config import ConfigError
from ..models.decoder import DecoderLM
from ..tokenizers import as_hf_tokenizer
from ..train import TrainConfig, TrainResult, train
from ..train.data import Batch, build_data
from .losses import LOSSES, distillation_loss, divergence
from .sequence import teacher_texts

__all__ = [
    "LOSSES",
    "DistillConfig",
    "Distiller",
    "distillation_loss",
    "divergence",
    "teacher_texts",
    "train_distill",
]


@dataclass(frozen=True)
class DistillConfig:
    """A training config's ``[distill]`` table.

    `teacher` is a checkpoint directory (or, through `slmlab.zoo`, a recipe's name). `loss`
    is one of `LOSSES`, computed at `temperature`; `alpha` weighs it against the data's
    cross-entropy (1: the teacher alone; 0: the data alone, training from scratch); `beta`
    is ``jsd``'s mixing weight.
    """

    teacher: str
    loss: str = "forward-kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(
                f"distill.teacher must be a checkpoint directory or zoo name, got {self.teacher!r}"
            )
        if self.loss not in LOSSES:
            raise ConfigError(f"distill.loss must be one of {list(LOSSES)}, got {self.loss!r}")

        def real(value) -> bool:
            return (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )

        if not (real(self.temperature) and self.temperature > 0):
            raise ConfigError(f"distill.temperature must be above 0, got {self.temperature!r}")
        if not (real(self.alpha) and 0 <= self.alpha <= 1):
            raise ConfigError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
        if not (real(self.beta) and 0 < self.beta < 1):
            raise ConfigError(f"distill.beta must be strictly between 0 and 1, got {self.beta!r}")

    @classmethod
    def of(cls, config: TrainConfig) -> DistillConfig:
        """The `DistillConfig` of a training config's ``distill`` table."""
        if config.distill is None:
            raise ConfigError("the training config has no [distill] table: nothing to learn from")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(config.distill) - set(known))
        if unknown:
            raise ConfigError(f"distill.{unknown[0]} is not a distillation field; known: {known}")
        if "teacher" not in config.distill:
            raise ConfigError("distill.teacher is missing: name the teacher's checkpoint")
        return cls(**config.distill)


class Distiller:
    """The loop's `slmlab.train.loop.Objective` for distillation: the teacher's hidden states
    for a micro-batch (no gradient), the student's, and `distillation_loss` between them."""

    def __init__(self, teacher: DecoderLM, settings: DistillConfig) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.settings = settings

    def __call__(
        self, student: torch.nn.Module, batch: Batch, autocast
    ) -> tuple[torch.Tensor, int]:
        ids = batch.ids
        if next(self.teacher.parameters()).device != ids.device:
            self.teacher.to(ids.device)
        inputs = ids[:, :-1]
        with torch.no_grad(), autocast():
            teacher_hidden = self.teacher(inputs, segments=batch.segments, head=False)
        with autocast():
            student_hidden = student(inputs, segments=batch.segments, head=False)
        labels = ids[:, 1:] if batch.targets is None else batch.targets
        head = getattr(student, "module", student).lm_head  # DDP wraps the model
        s = self.settings
        return distillation_loss(
            student_hidden, head, teacher_hidden, self.teacher.lm_head, labels,
            loss=s.loss, temperature=s.temperature, alpha=s.alpha, beta=s.beta, autocast=autocast,
        )  # fmt: skip


def load_teacher(source: str | Path) -> tuple[DecoderLM, Any]:
    """The teacher of checkpoint directory `source` and its tokenizer."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"distill.teacher {str(source)!r} is not a checkpoint directory (a zoo recipe's name "
            "is resolved by slmlab.zoo or `slmlab distill`)"
        )
    return load(path), load_tokenizer(path)


def train_distill(
    config: TrainConfig, out: str | Path, *, data=None, teacher: DecoderLM | None = None,
    **options,
) -> TrainResult:  # fmt: skip
    """Train the student `config` describes on its data, taught by the teacher its ``distill``
    table names (`slmlab.train.train`'s other options pass through). The data is read in the
    teacher's tokens; a `teacher` already in memory may be given."""
    settings = DistillConfig.of(config)
    if teacher is None:
        teacher, tokenizer = load_teacher(settings.teacher)
    else:
        tokenizer = load_tokenizer(settings.teacher)
    if data is None:
        data = build_data(config, tokenizer=tokenizer)
    elif as_hf_tokenizer(data.tokenizer).get_vocab(with_added_tokens=True) != as_hf_tokenizer(
        tokenizer
    ).get_vocab(with_added_tokens=True):
        raise ValueError(
            f"{settings.teacher}: the data was read with another tokenizer than the teacher's; "
            "build it with slmlab.train.data.build_data(config, tokenizer=the teacher's)"
        )
    if teacher.config.vocab_size != data.vocab_size:
        raise ValueError(
            f"{settings.teacher}: the teacher predicts {teacher.config.vocab_size} tokens, its "
            f"tokenizer has {data.vocab_size}; logit distillation needs one vocabulary (for two "
            "tokenizers, train on the teacher's texts: slmlab.distill.teacher_texts)"
        )
    return train(config, out, data=data, objective=Distiller(teacher, settings), **options)
