"""Rotary position embeddings (RoPE) and the frequency rescalings published configs use.

Each pair of channels (i, i + d/2) of a query or key is rotated by the angle ``position × ω_i``,
with ``ω_i = θ^(-2i/d)``. A dot product of two rotated vectors then depends only on the distance
between their positions. ``rope_theta`` (θ) sets how slowly the lowest frequencies turn;
the ``rope_scaling`` variants stretch the frequencies so a model can read longer contexts than
it was trained on: ``linear`` divides every frequency by a factor, ``llama3`` (Llama 3.1/3.2)
divides only the low frequencies and blends smoothly between the two regimes.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig

__all__ = ["apply_rope", "inverse_frequencies", "rotate_half"]


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The ``rotary_dim / 2`` angular frequencies ω_i, after any rope scaling, in fp32
    (``rotary_dim`` is ``head_dim`` unless the config rotates only part of each head)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept;
        # in between, a linear blend in 1/wavelength.
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        middle = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(middle, blended, inv_freq)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (−x2, x1) on the two halves of the last dimension: a 90° turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (batch, heads, tokens, head_dim) by the angles whose cos/sin are given.

    ``x·cos + rotate_half(x)·sin`` written as two fused operations for speed: rolling the last
    dimension by half swaps the halves, and `signed_sin` carries the minus sign of the first
    half (``signed_sin = cat(−sin, sin)`` over the two halves, see `RotaryEmbedding`).
    Tables narrower than `x` turn its first channels and pass the others through (a partial
    rotary embedding, as GPT-NeoX, Phi and Bamba use).
    """
    rotated = cos.shape[-1]
    if rotated < x.shape[-1]:
        turned = apply_rope(x[..., :rotated], cos, signed_sin)
        return torch.cat((turned, x[..., rotated:]), dim=-1)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
