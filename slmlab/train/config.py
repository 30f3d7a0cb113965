"""A training run's recipe: the model, the data, the optimizer and the schedule, in one place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layers.lora import LoraConfig, LoraError
from ..models.config import ConfigError, ModelConfig

__all__ = ["TrainConfig"]

PRECISIONS = ("fp32", "bf16", "bf16-residual", "auto")
OPTIMIZERS = ("adamw", "muon")
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
OBJECTIVES = ("next-token", "sft", *PREFERENCE_OBJECTIVES)
# Each preference objective's beta where the config leaves it out: the papers' and TRL's.
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
CHAT_DATA = {"story-qa": "questions about generated stories, answers known (chapter 06)"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's numbers. The same config and seed give the same weights.

    `model` holds the `ModelConfig` fields except ``vocab_size``, which is the tokenizer's.
    `data` names a corpus (`slmlab.data.NAMED_CORPORA`: ``stories``, `data_size` of them;
    ``python``; ``python-docs``) or is a path / ``hf:NAME`` for the reader's own text. `superwords` lets the
    tokenizer's merges cross spaces (`slmlab.tokenizers.train_bpe`). `batch_size` is the
    number of sequences per optimizer step across all processes and micro-batches.
    `optimizer` is ``adamw`` or ``muon`` (Muon for the blocks' matrices and AdamW for the
    rest, one `lr` and schedule for both: see `slmlab.train.muon`). `embedding_lr_scale`
    multiplies the embedding table's learning rate (and the tied head's): words that
    pre-training never had to tell apart are pulled apart sooner in fine-tuning (chapter 06).
    `init_from` is a checkpoint directory (or, through `slmlab.zoo`, a zoo recipe's name) whose
    weights the run starts from: fine-tuning. `qat` holds a `QuantConfig`'s fields: train
    through the rounding the model will be stored with (chapter 08).

    `objective` is ``next-token`` (pre-training: every token is learnt) or ``sft`` (supervised
    fine-tuning, chapter 06: `data` is conversations, ``story-qa`` or a jsonl file of them,
    and only the assistant's replies are learnt; `init_from` is required, `data_size` counts
    examples). `lora` holds a `slmlab.layers.lora.LoraConfig`'s fields: train a low-rank
    update of the named layers and nothing else.

    ``dpo``, ``simpo`` and ``orpo`` are preference tuning (`slmlab.train.preference`): `data`
    is pairs (``story-qa``, or a jsonl file of ``{"prompt", "chosen", "rejected"}``),
    `batch_size` counts pairs, `beta` scales the preference (by default 0.1, 2.0 and 0.1) and
    `simpo_gamma` is SimPO's margin. `quantize_base` holds a `QuantConfig`'s fields (NF4 in
    blocks of 64 for QLoRA): with `lora`, the frozen base's linear layers are stored rounded
    while the update trains in full precision (`slmlab.finetune.finetune` runs it).

    `precision` is ``fp32``; ``bf16``, the products under bf16 autocast while the weights,
    their gradients and the residual stream between blocks stay fp32 (mixed precision);
    ``bf16-residual``, the same with the hidden state between blocks in bf16 too, as QLoRA
    trains (a 4-bit storage type, a bf16 compute type): what activation checkpointing keeps
    and every block's saved activations take half the memory, at the cost of rounding the
    stream the blocks add into; or ``auto``, bf16 where the device computes it fast.

    `head_chunk` (0: all at once) is how many learnt positions the ``sft`` loss turns into
    logits at a time, each piece recomputed in the backward pass instead of kept: over
    SmolLM2's 49,152 words, the logits of 128 reply tokens and their gradient are 72 MiB, a
    sixth of QLoRA's peak with its blocks recomputed (chapter 06).

    `distill` holds a `slmlab.distill.DistillConfig`'s fields (the teacher, the loss, its
    temperature): the model learns the teacher's next-token distributions on next-token data
    read with the teacher's tokenizer (`slmlab.distill.train_distill` runs it).
    """

    model: dict[str, Any]
    data: str = "stories"
    data_size: int = 20_000
    vocab_size: int = 1024
    superwords: bool = False
    seq_len: int = 128
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 1000
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    embedding_lr_scale: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 0
    seed: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    head_chunk: int = 0
    init_from: str | None = None
    qat: dict[str, Any] | None = None
    objective: str = "next-token"
    lora: dict[str, Any] | None = None
    beta: float | None = None
    simpo_gamma: float = 0.5
    quantize_base: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        for name in (
            "data_size",
            "vocab_size",
            "seq_len",
            "batch_size",
            "grad_accum",
            "steps",
            "eval_batches",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed", "head_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(
                f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        # A negative clip reverses the gradient, 0 stops learning; NaN passes every comparison.
        for name, zero_allowed in (
            ("grad_clip", False),
            ("weight_decay", True),
            ("embedding_lr_scale", False),
        ):
            value = getattr(self, name)
            real = isinstance(value, int | float) and not isinstance(value, bool)
            if (
                not (real and math.isfinite(value))
                or value < 0
                or (value == 0 and not zero_allowed)
            ):
                kind = "0 or more" if zero_allowed else "a positive number"
                raise ConfigError(f"{name} must be {kind}, got {value!r}")
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})"
            )
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"grad_accum ({self.grad_accum}) must divide batch_size ({self.batch_size}): "
                "each micro-batch gets the same number of sequences"
            )
        for name in ("superwords", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ConfigError(
                f"init_from must be a path or a zoo recipe name, got {self.init_from!r}"
            )
        if self.qat is not None and not isinstance(self.qat, dict):
            raise ConfigError(f"qat must be a table of QuantConfig fields, got {self.qat!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}"
            )
        if self.objective != "next-token" and self.init_from is None:
            raise ConfigError(
                f"objective {self.objective} fine-tunes a trained model: set init_from to its "
                "checkpoint directory or zoo name"
            )
        if self.head_chunk and (self.objective != "sft" or self.distill is not None):
            raise ConfigError(
                f"head_chunk is for the sft objective's loss; {self.objective}"
                f"{' with distill' if self.distill is not None else ''} computes its own: "
                "set head_chunk = 0"
            )
        for name in ("beta", "simpo_gamma"):
            value = getattr(self, name)
            real = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (real and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number of 0 or more, got {value!r}")
        if self.beta == 0:
            raise ConfigError("beta must be positive: at 0 the preference loss learns nothing")
        if self.lora is not None:
            self.lora_config()  # validates the fields
            if self.optimizer != "adamw":
                raise ConfigError("lora trains with optimizer adamw (Muon is for whole matrices)")
            if self.init_from is None:
                raise ConfigError("lora adapts a trained model: set init_from")
            if self.qat is not None:
                raise ConfigError("lora and qat do not combine; choose one")
        if self.quantize_base is not None:
            if not isinstance(self.quantize_base, dict):
                raise ConfigError(
                    f"quantize_base must be a table of QuantConfig fields, got {self.quantize_base!r}"
                )
            if self.lora is None:
                raise ConfigError(
                    "quantize_base freezes a rounded base under a LoRA update (QLoRA): set lora too"
                )
        if self.distill is not None:
            if not isinstance(self.distill, dict):
                raise ConfigError(
                    f"distill must be a table of DistillConfig fields, got {self.distill!r}"
                )
            if self.objective != "next-token":
                raise ConfigError(
                    f"distill learns a teacher's next-token distributions on text: objective "
                    f"must be next-token, got {self.objective!r}"
                )
            if self.qat is not None:
                raise ConfigError("distill and qat do not combine; choose one")
        if "vocab_size" in self.model:
            raise ConfigError("model.vocab_size comes from the tokenizer: set vocab_size instead")
        self.model_config(self.vocab_size)  # validates the model fields

    def lora_config(self) -> LoraConfig | None:
        """The `LoraConfig` of the `lora` table, or None."""
        if self.lora is None:
            return None
        if not isinstance(self.lora, dict):
            raise ConfigError(f"lora must be a table of LoraConfig fields, got {self.lora!r}")
        try:
            return LoraConfig(**self.lora)
        except TypeError:
            known = sorted(LoraConfig.__dataclass_fields__)
            unknown = sorted(set(self.lora) - set(known))
            raise ConfigError(f"lora.{unknown[0]} is not a LoRA field; known: {known}") from None
        except LoraError as err:
            raise ConfigError(str(err)) from None

    @property
    def preference_beta(self) -> float:
        """The beta a preference objective trains with: `beta`, or the objective's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.objective]

    def model_config(self, vocab_size: int, eos_token_id: int | None = None) -> ModelConfig:
        """The model's config; `eos_token_id` is the document separator the tokenizer assigned
        (generation stops there, and evaluation conditions a document's first token on it)."""
        return ModelConfig.from_dict(
            {
                **self.model,
                "vocab_size": vocab_size,
                "eos_token_id": eos_token_id,
                "max_position_embeddings": self.model.get("max_position_embeddings", self.seq_len),
            }
        )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the recipe: a cached run is reused only for the very same recipe.

        It covers the fields that differ from their defaults, so a field added later with a
        default that keeps today's behaviour leaves every existing fingerprint as it was."""
        defaults = TrainConfig(model=self.model).to_dict()
        changed = {k: v for k, v in self.to_dict().items() if k == "model" or v != defaults[k]}
        return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if "extra" in data:  # configs written before init_from and qat were fields of their own
            data = dict(data)
            extra = data.pop("extra") or {}
            if not isinstance(extra, dict):
                raise ConfigError(f"extra must be a table, got {extra!r}")
            gone = sorted(set(extra) - {"init_from", "qat"})
            if gone:
                raise ConfigError(
                    f"extra.{gone[0]} no longer exists: quick mode belongs to the zoo "
                    "(slmlab.zoo.Recipe.quick_steps); delete it from the config"
                    if gone[0] == "quick_steps"
                    else f"extra.{gone[0]} is not a training config field; known: {sorted(names)}"
                )
            data.update(extra)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training config field(s) {unknown}; known: {sorted(names)}")
        if "model" not in data:
            raise ConfigError("training config is missing the [model] section")
        return cls(**data)

    def to_toml(self) -> str:
        """The config as TOML (run settings, then the ``[model]`` and ``[qat]`` tables): what
        `from_file` reads, for ``slmlab train --config`` and ``torchrun``."""

        def value(v: Any) -> str:  # TOML's inline tables and arrays; strings and numbers as JSON
            if isinstance(v, dict):
                return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
            if isinstance(v, list | tuple):
                return "[" + ", ".join(value(x) for x in v) + "]"
            if v is None:
                raise ConfigError("TOML has no null: leave the field out or give it a value")
            return json.dumps(v)

        def lines(table: dict[str, Any]) -> list[str]:
            return [f"{key} = {value(v)}" for key, v in table.items()]

        tables = ("model", "qat", "lora", "quantize_base", "distill")
        top = {k: v for k, v in self.to_dict().items() if k not in tables and v is not None}
        text = [*lines(top), "", "[model]", *lines(self.model)]
        for table in tables[1:]:
            if getattr(self, table):
                text += ["", f"[{table}]", *lines(getattr(self, table))]
        return "\n".join(text) + "\n"

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a TOML (or JSON) file: top-level run settings and a ``[model]`` table."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read training config ({err})") from None
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{path}: {err}") from None
