"""Knowledge distillation (chapter 07): a small student taught by a larger teacher.

The ways the teacher's knowledge reaches the student:

* **logits** (`train_distill`, a training config with a ``[distill]`` table): at every
  position of the training text the student learns the teacher's whole next-token
  distribution, not just the one token the text has (`slmlab.distill.losses`: forward or
  reverse KL, generalised JSD, total variation, mixed with the data's cross-entropy). Teacher
  and student share a tokenizer: the student reads the data in the teacher's tokens.
* **attention relations** (``relations``, MiniLMv2): how one attention layer's tokens relate
  to each other (`slmlab.distill.relations`), learnt beside the next-token distributions; it
  compares models of any widths and head counts without a projection to train.
* **hidden states** (``features``, FitNets and TinyBERT): the student's residual stream after
  one block, mapped by a matrix learnt with it (`slmlab.distill.features`), is pulled towards
  the teacher's after one of its blocks.
* **the student's own samples** (``on_policy``, GKD's on-policy distillation): a share of the
  rows keep their first half and the student writes the rest; the teacher then grades the
  student's continuation token by token. The student is taught where it goes itself, not only
  where the data goes, which a student that drifts off the data at inference needs.
* **sequences** (`teacher_texts`): the teacher writes texts and the student is pre-trained on
  them (Kim and Rush's sequence-level KD). It needs nothing of the teacher but its text, so it
  works between any two tokenizers, and it makes data where there is little.

The run is a training run of `slmlab.train` (checkpoints, exact resume, metrics), whose
validation loss is the student's own cross-entropy on the data, comparable with a student
trained from scratch. The teacher's top-k distributions may be read from a cache made once
(`slmlab.distill.cache`) instead of running the teacher at every step.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load, load_tokenizer
from ..data.chat import IGNORE
from ..infer.generate import generate
from ..models.config import ConfigError
from ..models.decoder import DecoderLM
from ..tokenizers import as_hf_tokenizer
from ..train import TrainConfig, TrainResult, train
from ..train.data import Batch, build_data
from .cache import CachedTeacherHead, TeacherCache, cache_teacher
from .features import block_output, feature_loss, feature_projection
from .losses import LOSSES, distillation_loss, divergence
from .relations import attention_inputs, relation_loss, relations
from .sequence import teacher_texts

__all__ = [
    "LOSSES",
    "CachedTeacherHead",
    "DistillConfig",
    "Distiller",
    "TeacherCache",
    "cache_teacher",
    "distillation_loss",
    "divergence",
    "feature_loss",
    "feature_projection",
    "relation_loss",
    "relations",
    "student_continuations",
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

    `cache` names a teacher cache file (`slmlab.distill.cache`) holding the teacher's `top_k`
    most likely tokens at every position of the training rows: made by the first run that
    names it, read by every later one, and the teacher no longer runs during training.
    `on_policy` is the share of rows (GKD's λ) whose second half the student writes itself,
    sampled at temperature 1, before the teacher grades it; those rows learn the divergence
    alone, on the student's tokens.

    `relations` weighs MiniLMv2's self-attention relation loss (0: none) between the teacher's
    and the student's blocks `relation_layers` (−1: the last), in `relation_heads` relation
    heads, which must divide both models' query and key/value widths.

    `features` weighs the hidden-state loss (0: none) between the residual streams leaving the
    teacher's and the student's blocks `feature_layers` (−1: the last), the student's mapped to
    the teacher's width by a projection that trains with it.
    """

    teacher: str
    loss: str = "forward-kl"
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.5
    cache: str | None = None
    top_k: int = 16
    on_policy: float = 0.0
    relations: float = 0.0
    relation_heads: int = 4
    relation_layers: tuple[int, int] = (-1, -1)
    features: float = 0.0
    feature_layers: tuple[int, int] = (-1, -1)

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
        if self.cache is not None and (not isinstance(self.cache, str) or not self.cache):
            raise ConfigError(f"distill.cache must be a file path, got {self.cache!r}")
        if not (
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k > 0
        ):
            raise ConfigError(
                f"distill.top_k must be a positive number of tokens, got {self.top_k!r}"
            )
        if not (real(self.on_policy) and 0 <= self.on_policy <= 1):
            raise ConfigError(f"distill.on_policy must be in [0, 1], got {self.on_policy!r}")
        if not (real(self.relations) and self.relations >= 0):
            raise ConfigError(f"distill.relations must be a weight ≥ 0, got {self.relations!r}")
        heads = self.relation_heads
        if not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0):
            raise ConfigError(f"distill.relation_heads must be a positive count, got {heads!r}")
        if not (real(self.features) and self.features >= 0):
            raise ConfigError(f"distill.features must be a weight ≥ 0, got {self.features!r}")
        for name in ("relation_layers", "feature_layers"):
            layers = getattr(self, name)
            if not (
                isinstance(layers, list | tuple)
                and len(layers) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise ConfigError(
                    f"distill.{name} must be [teacher's block, student's block], got {layers!r}"
                )
            object.__setattr__(self, name, tuple(layers))  # TOML reads a list
        for name, needs in (("relations", "attention"), ("features", "hidden states")):
            if self.cache is not None and getattr(self, name) > 0:
                raise ConfigError(
                    f"distill.cache keeps the teacher's predictions, not its {needs}, which "
                    f"distill.{name} needs: drop one of them"
                )
        if self.cache is not None and self.on_policy > 0:
            raise ConfigError(
                "distill.cache holds the teacher on the data's rows, distill.on_policy asks it "
                "about the student's own: drop one of them"
            )

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
    """The loop's `slmlab.train.loop.Objective` for distillation: the teacher's distributions
    for a micro-batch (its hidden states, run without gradient, or its cached top-k rows), the
    student's hidden states, and `distillation_loss` between them. With ``on_policy`` some rows
    are first continued by the student (`student_continuations`).

    With ``features`` the objective has weights of its own, `weights` (the projection from the
    student's width, `student_width`, to the teacher's; drawn with `seed`), which the training
    loop trains beside the student's and saves with the run, not with the student."""

    def __init__(
        self,
        teacher: DecoderLM | None,
        settings: DistillConfig,
        cache: TeacherCache | None = None,
        *,
        student_width: int | None = None,
        seed: int = 0,
    ) -> None:
        if (teacher is None) == (cache is None):
            raise ValueError("a Distiller learns from a teacher or from its cache: give one")
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.cache = cache
        self.settings = settings
        self.weights: torch.nn.Module | None = None
        if settings.features:
            if teacher is None or student_width is None:
                raise ValueError("hidden-state distillation needs the teacher and student_width")
            width = teacher.config.hidden_size
            self.weights = feature_projection(student_width, width, seed)

    def __call__(
        self, student: torch.nn.Module, batch: Batch, autocast
    ) -> tuple[torch.Tensor, int]:
        s = self.settings
        labels = batch.ids[:, 1:] if batch.targets is None else batch.targets
        if s.on_policy == 0:
            return self._loss(student, batch.ids, batch.segments, labels, autocast, s.alpha)
        if batch.segments is not None:
            raise ValueError("on-policy distillation continues plain text rows, not packed chats")
        ids, labels, sampled = student_continuations(
            getattr(student, "module", student), batch.ids, s.on_policy
        )
        total, count = torch.zeros((), device=ids.device), 0
        # The student's own tokens are graded by the teacher alone: no text to cross-check.
        for rows, alpha in ((~sampled, s.alpha), (sampled, 1.0)):
            if rows.any():
                part, n = self._loss(student, ids[rows], None, labels[rows], autocast, alpha)
                total, count = total + part, count + n
        return total, count

    def _watch(self, model: torch.nn.Module, stack: ExitStack, side: int):
        """Hooks on `model` (the teacher: `side` 0, the student: 1) for the relation and feature
        terms the settings ask for: lists filled with what they saw when `stack` closes."""
        s = self.settings
        qkv = hidden = None
        if s.relations:
            qkv = stack.enter_context(attention_inputs(model, s.relation_layers[side]))
        if s.features:
            hidden = stack.enter_context(block_output(model, s.feature_layers[side]))
        return qkv, hidden

    def _loss(self, student, ids, segments, labels, autocast, alpha):
        s = self.settings
        inputs = ids[:, :-1]
        inner = getattr(student, "module", student)  # DDP wraps the model
        if (s.relations or s.features) and segments is not None:
            raise ValueError("attention relations and hidden states are taken over plain text "
                             "rows, not packed chats")  # fmt: skip
        teacher_qkv = teacher_hidden = None
        if self.cache is not None:
            teacher_rows, teacher_head = self.cache.rows(ids), self.cache.head
        else:
            assert self.teacher is not None
            if next(self.teacher.parameters()).device != ids.device:
                self.teacher.to(ids.device)
            with ExitStack() as stack:
                teacher_qkv, teacher_hidden = self._watch(self.teacher, stack, 0)
                with torch.no_grad(), autocast():
                    teacher_rows = self.teacher(inputs, segments=segments, head=False)
            teacher_head = self.teacher.lm_head
        with ExitStack() as stack:
            student_qkv, student_hidden_at = self._watch(inner, stack, 1)
            with autocast():
                student_hidden = student(inputs, segments=segments, head=False)
        total, count = distillation_loss(
            student_hidden, inner.lm_head, teacher_rows, teacher_head, labels,
            loss=s.loss, temperature=s.temperature, alpha=alpha, beta=s.beta, autocast=autocast,
        )  # fmt: skip
        if s.relations:
            total = total + s.relations * relation_loss(teacher_qkv, student_qkv, s.relation_heads)
        if s.features:
            assert self.weights is not None and teacher_hidden and student_hidden_at
            total = total + s.features * feature_loss(
                teacher_hidden[0], student_hidden_at[0], self.weights
            )
        return total, count


def student_continuations(
    student: DecoderLM, ids: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GKD's on-policy rows: each training row (L + 1 tokens) is picked with probability
    `share`, and a picked row keeps its first half while the student writes the rest (sampled
    at temperature 1). Returns the rows, their labels (the next tokens; in a picked row only
    the student's tokens are learnt, the prompt's positions are `IGNORE`) and which rows were
    picked.

    Both draws are seeded by the rows' own tokens: a step's rows always get the same
    continuations from the same weights, so a resumed run repeats a run never stopped."""
    digest = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    picked = (torch.rand(len(ids), generator=generator) < share).to(ids.device)
    labels = ids[:, 1:].clone()
    if not picked.any():
        return ids, labels, picked
    length = ids.shape[1]
    prompt = length // 2
    was_training = student.training
    student.eval()
    written = generate(
        student, ids[picked, :prompt], length - prompt, temperature=1.0, seed=seed, stop_tokens=()
    )
    student.train(was_training)
    ids = ids.clone()
    ids[picked] = written
    labels = ids[:, 1:].clone()
    labels[picked, : prompt - 1] = IGNORE
    return ids, labels, picked


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
    cached = settings.cache is not None and Path(settings.cache).is_file()
    if teacher is None and not cached:
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
    if teacher is not None and teacher.config.vocab_size != data.vocab_size:
        raise ValueError(
            f"{settings.teacher}: the teacher predicts {teacher.config.vocab_size} tokens, its "
            f"tokenizer has {data.vocab_size}; logit distillation needs one vocabulary (for two "
            "tokenizers, train on the teacher's texts: slmlab.distill.teacher_texts)"
        )
    if settings.cache is None:
        width = config.model_config(data.vocab_size, data.end_token_id()).hidden_size
        objective = Distiller(teacher, settings, student_width=width, seed=config.seed)
        return train(config, out, data=data, objective=objective, **options)
    if not cached:
        assert teacher is not None
        cache_teacher(
            teacher, data.train, settings.cache, k=settings.top_k,
            temperature=settings.temperature, name=settings.teacher,
            progress=options.get("progress", True),
        )  # fmt: skip
    cache = TeacherCache(settings.cache)
    cache.check(k=settings.top_k, temperature=settings.temperature, vocab_size=data.vocab_size)
    objective = Distiller(None, settings, cache=cache)
    return train(config, out, data=data, objective=objective, **options)
