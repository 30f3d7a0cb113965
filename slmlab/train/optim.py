"""The optimizer and its schedule: AdamW or Muon, warm-up then cosine decay."""

from __future__ import annotations

import math

import torch

from ..models.decoder import DecoderLM
from .config import TrainConfig
from .muon import Muon

__all__ = ["build_optimizer", "lr_at"]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


def build_optimizer(model: DecoderLM, config: TrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer` over `model`'s parameters: matrices (and the embedding) decay, norms
    and biases never do (nanoGPT's and Llama's choice). Frozen parameters (LoRA's base) are
    left out. With `config.embedding_lr_scale` other than 1 the embedding table is a group of
    its own whose ``lr_scale`` the training loop multiplies the schedule's rate by."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    embedding = getattr(model.model.embed_tokens, "weight", None)  # None: rounded (QLoRA)
    scaled_embedding = config.embedding_lr_scale != 1 and embedding is not None
    apart = [embedding] if scaled_embedding and embedding.requires_grad else []
    decay = [p for p in decay if not any(p is e for e in apart)]
    scaled = [{"params": apart, "lr_scale": config.embedding_lr_scale}] if apart else []
    if config.optimizer == "muon":
        # Muon for the blocks' matrices; the embedding (the tied head) stays with AdamW.
        in_blocks = {id(p) for p in model.model.layers.parameters()}
        return Muon(
            [
                {"params": [p for p in decay if id(p) in in_blocks], "muon": True},
                {"params": [p for p in decay if id(p) not in in_blocks]},
                {"params": no_decay, "weight_decay": 0.0},
                *scaled,
            ],
            lr=config.lr,
            weight_decay=config.weight_decay,
            betas=config.betas,
        )
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
            *[{**group, "weight_decay": config.weight_decay} for group in scaled],
        ],
        lr=config.lr,
        betas=config.betas,
        eps=1e-8,
        foreach=False,
    )
