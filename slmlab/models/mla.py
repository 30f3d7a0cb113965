"""Multi-head latent attention (DeepSeek-V2 and V3): every head's keys and values from one small
latent per token, so the cache holds the latent instead of the heads.

A token's hidden state goes down to a latent of ``kv_lora_rank`` channels (``kv_a_proj_with_mqa``,
then an RMSNorm), and ``kv_b_proj`` brings it back up to each head's key (``qk_nope_head_dim``
channels) and value (``v_head_dim``). Rotation cannot pass through that shared latent (RoPE's
angle depends on the position, a projection of the latent does not), so a small extra key of
``head_dim`` channels (transformers' ``qk_rope_head_dim``) comes straight from the hidden state,
is rotated, and is shared by every head; each query has the same two parts. The cache stores the
normed latent and the rotated shared key: ``kv_lora_rank + head_dim`` numbers a token and layer,
against ``2 × heads × head dim`` for ordinary attention (DeepSeek-V3: 576 against 32,768).

Decoding here expands the cached latents into keys and values at every step, as transformers
does; DeepSeek's inference instead folds ``kv_b_proj`` into the query and output projections
and attends in the latent itself, which reads less when the context is long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope

__all__ = ["LatentAttention"]


def interleaved_to_halves(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rotated channels come in pairs side by side (x0, x1), (x2, x3)...; rotate-half
    wants each pair's halves apart (x0, x2, ..., x1, x3, ...): the same rotation, reordered."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class LatentAttention(nn.Module):
    """DeepSeek-V3's attention, transformers' parameter names: ``q_proj`` (or ``q_a_proj``,
    ``q_a_layernorm``, ``q_b_proj`` with a query latent), ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``."""

    sliding_window = None  # never slides

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = (
            config.qk_nope_head_dim,
            config.head_dim,
            config.v_head_dim,
        )
        self.rank = config.kv_lora_rank
        self.interleave = config.rope_interleave
        width, heads, qk = config.hidden_size, self.num_heads, self.nope + self.rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(width, heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(width, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(width, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, width, bias=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(interleaved_to_halves(x) if self.interleave else x, cos, sin)

    def latents(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache keeps for `x` (B, T, width): the normed latent (B, 1, T, rank) and the
        rotated shared key (B, 1, T, head_dim)."""
        B, T, _ = x.shape
        latent, shared = linear(x, self.kv_a_proj_with_mqa).split([self.rank, self.rope], -1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.rank)
        return latent, self._rotate(shared.view(B, 1, T, self.rope), cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache=None,
        slot: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if hasattr(self, "q_proj"):
            q = linear(x, self.q_proj)
        else:
            q = linear(self.q_a_layernorm(linear(x, self.q_a_proj)), self.q_b_proj)
        q = q.view(B, T, self.num_heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], -1)
        q = torch.cat((q_nope, self._rotate(q_rot, cos, sin)), -1)
        latent, shared = self.latents(x, cos, sin)
        if cache is not None:  # the cache's keys are latents, its values the shared keys
            latent, shared = cache.update(
                self.layer_index if slot is None else slot, latent, shared
            )
        S = latent.shape[2]
        kv = linear(latent[:, 0], self.kv_b_proj).view(B, S, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat((k_nope, shared.expand(B, self.num_heads, S, self.rope)), -1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1
        )  # scale 1/√(nope + rope): SDPA's default for these queries
        return linear(out.transpose(1, 2).reshape(B, T, -1), self.o_proj)
