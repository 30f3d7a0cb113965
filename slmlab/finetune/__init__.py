"""Fine-tuning (chapter 06): a trained model taught to answer, in one call.

`finetune_config(base, method=...)` writes the training recipe that fine-tunes checkpoint
`base`: its architecture read from the checkpoint, the chat data, and the method:

* ``sft``: every weight trains on the replies (supervised fine-tuning);
* ``lora``: the weights stay frozen and a low-rank update of each named layer trains
  (`slmlab.layers.lora`), saved as a PEFT adapter beside the base weights.

The recipe runs through the same loop as pre-training (`slmlab.train.train`: checkpoints,
exact resume, torchrun), so `finetune` is `finetune_config` then `train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..layers.lora import LoraConfig
from ..models.config import ModelConfig
from ..models.swap import LINEAR_TARGETS
from ..train import TrainConfig, TrainResult, train

__all__ = ["METHODS", "finetune", "finetune_config"]

METHODS = ("sft", "lora")
# The architecture fields a fine-tuning recipe copies from its base (the vocabulary and the
# special ids come from the tokenizer the run builds).
_ARCHITECTURE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "bos_token_id",
    "pad_token_id",
    "model_type",
)


def finetune_config(
    base: str | Path,
    *,
    method: str = "sft",
    data: str = "story-qa",
    examples: int = 4000,
    steps: int = 300,
    lr: float | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = LINEAR_TARGETS,
    seed: int = 0,
    **fields: Any,
) -> TrainConfig:
    """The recipe that fine-tunes checkpoint directory `base` on `data` (``story-qa``, or a
    jsonl file of conversations) with `method`, `examples` conversations, `steps` optimizer
    steps of `batch_size` packed rows of `seq_len` tokens (by default the base's context, at
    most 512). `lr` defaults to 1e-3 for LoRA and 5e-4 for full fine-tuning; `rank`, `alpha`
    (by default twice the rank) and `targets` shape LoRA's update. Other `fields` are
    `TrainConfig`'s."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    model = ModelConfig.from_json(Path(base) / "config.json").to_dict()
    architecture = {k: model[k] for k in _ARCHITECTURE if model[k] is not None}
    lora = None
    if method == "lora":
        lora = LoraConfig(r=rank, alpha=alpha or 2.0 * rank, targets=tuple(targets)).to_dict()
    settings: dict[str, Any] = dict(
        model=architecture,
        objective="sft",
        data=data,
        data_size=examples,
        seq_len=seq_len or min(architecture["max_position_embeddings"], 512),
        batch_size=batch_size,
        steps=steps,
        lr=lr if lr is not None else (1e-3 if lora else 5e-4),
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        eval_every=max(1, steps // 5),
        init_from=str(base),
        lora=lora,
        seed=seed,
    )
    settings["min_lr"] = settings["lr"] / 10
    return TrainConfig(**{**settings, **fields})


def finetune(
    base: str | Path, out: str | Path, *, method: str = "sft", **options: Any
) -> TrainResult:
    """Fine-tune checkpoint `base` into run folder `out` (`finetune_config`'s `options`, and
    `slmlab.train.train`'s ``max_steps``, ``resume``, ``progress``, ``device``)."""
    run = {k: options.pop(k) for k in ("max_steps", "resume", "progress", "device") if k in options}
    return train(finetune_config(base, method=method, **options), out, **run)
