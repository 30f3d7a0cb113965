"""Fine-tuning (chapter 06): a trained model taught to answer, in one call.

`finetune_config(base, method=...)` writes the training recipe that fine-tunes checkpoint
`base`: its architecture read from the checkpoint, the chat data, and the method:

* ``sft``: every weight trains on the replies (supervised fine-tuning);
* ``lora``: the weights stay frozen and a low-rank update of each named layer trains
  (`slmlab.layers.lora`), saved as a PEFT adapter beside the base weights;
* ``qlora``: LoRA over a base whose linear layers are stored in 4-bit NF4 (blocks of 64, as
  bitsandbytes stores them): the frozen weights take an eighth of their fp32 memory, and the
  gradient reaches the update through their dequantized values;
* ``dpo``, ``simpo``, ``orpo``: preference tuning on pairs of a right and a wrong reply
  (`slmlab.train.preference`): DPO and SimPO polish a model that already answers (an SFT
  model), ORPO teaches a base model to answer and to prefer in one run.

The recipe runs through the same loop as pre-training (`slmlab.train.train`: checkpoints,
exact resume, torchrun), so `finetune` is `finetune_config` then `train`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..layers.lora import LoraConfig
from ..models.config import ModelConfig
from ..models.decoder import DecoderLM
from ..models.swap import LINEAR_TARGETS
from ..quant import QuantConfig, quantize_
from ..train import TrainConfig, TrainResult, train

__all__ = [
    "METHODS",
    "PREFERENCE_METHODS",
    "finetune",
    "finetune_config",
    "round_base_",
    "train_finetune",
]

PREFERENCE_METHODS = ("dpo", "simpo", "orpo")
METHODS = ("sft", "lora", "qlora", *PREFERENCE_METHODS)
# QLoRA's base: NF4 codes in blocks of 64 weights with one absmax each (Dettmers et al., 2023).
QLORA_BASE = {"fmt": "nf4", "bits": 4, "group_size": 64}
# Learning rates where the caller gives none: full SFT, LoRA's larger step for its small
# update, and preference tuning's small one (it refines a model; ORPO also teaches, like SFT).
DEFAULT_LR = {"sft": 5e-4, "lora": 1e-3, "qlora": 1e-3, "dpo": 5e-5, "simpo": 5e-5, "orpo": 5e-4}
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
    "sliding_window",
    "layer_types",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "norm_topk_prob",
    "router_aux_loss_coef",
)
# ...and those of a hybrid's Mamba-2 layers, where it has some.
_MAMBA_ARCHITECTURE = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("mamba_")
)


def _qlora_base(architecture: dict[str, Any]) -> dict[str, Any]:
    """`QLORA_BASE`, with blocks of 32 where 64 does not divide a layer's input width (each
    block lies within a row here; stories-8m is 288 wide)."""
    widths = (architecture["hidden_size"], architecture["intermediate_size"])
    group = QLORA_BASE["group_size"]
    return {**QLORA_BASE, "group_size": group if all(w % group == 0 for w in widths) else 32}


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
    jsonl file of conversations, or of preference pairs for a preference method) with
    `method`, `examples` conversations (or pairs), `steps` optimizer steps of `batch_size`
    packed rows (or pairs) of `seq_len` tokens (by default the base's context, at most 512).
    `lr` defaults to `DEFAULT_LR`'s; `rank`, `alpha` (by default twice the rank) and `targets`
    shape LoRA's update. Other `fields` are `TrainConfig`'s (``beta``, say)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    model = ModelConfig.from_json(Path(base) / "config.json").to_dict()
    copied = _ARCHITECTURE + (_MAMBA_ARCHITECTURE if model["mamba_n_heads"] else ())
    architecture = {k: model[k] for k in copied if model[k] is not None}
    lora = None
    if method in ("lora", "qlora"):
        lora = LoraConfig(r=rank, alpha=alpha or 2.0 * rank, targets=tuple(targets)).to_dict()
    settings: dict[str, Any] = dict(
        model=architecture,
        objective=method if method in PREFERENCE_METHODS else "sft",
        data=data,
        data_size=examples,
        seq_len=seq_len or min(architecture["max_position_embeddings"], 512),
        batch_size=batch_size,
        steps=steps,
        lr=lr if lr is not None else DEFAULT_LR[method],
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        eval_every=max(1, steps // 5),
        init_from=str(base),
        lora=lora,
        quantize_base=_qlora_base(architecture) if method == "qlora" else None,
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
    return train_finetune(finetune_config(base, method=method, **options), out, **run)


def round_base_(model: DecoderLM, config: TrainConfig) -> DecoderLM:
    """QLoRA's step before training: every linear layer of `model` under its LoRA update
    (and every other one of the blocks) stored as ``config.quantize_base`` says; the updates
    and the output head stay in full precision."""
    assert config.quantize_base is not None
    skip = ("lm_head", "lora_A", "lora_B")
    quantize_(
        model, QuantConfig.from_table({**config.quantize_base, "skip": skip}, "quantize_base")
    )
    # A model read by `slmlab.checkpoint.load` holds its weights in the file's memory map, and
    # the weights that stay in full precision (the embedding, the norms) would keep the whole
    # map resident, the fp32 weights just rounded away with it: copies of their own let it go.
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.clone()
    return model


def train_finetune(config: TrainConfig, out: str | Path, **options: Any) -> TrainResult:
    """`slmlab.train.train` for any fine-tuning recipe, QLoRA's included (its base rounded by
    `round_base_` once the update is on)."""
    if config.quantize_base is None:
        return train(config, out, **options)
    return train(config, out, prepare=lambda model: round_base_(model, config), **options)
