"""KV caches beyond the plain one: int8 storage, and a window with attention sinks.

`Int8KVCache`: the cache grows with every token of every row: for a small model with a long
context it can outgrow the weights (chapter 01 counts it). Each cached key and value vector
(one per row, head and position) is stored as int8 with its own fp32 scale, absmax / 127;
attention reads them back dequantized. One scale per vector of head_dim values costs
32/head_dim extra bits.

`SinkKVCache`: generation past the context a model was trained on, with a cache of fixed size
(StreamingLLM, Xiao et al., 2024): the first few tokens stay, the most recent ones slide.
"""

from __future__ import annotations

import torch

from ..layers.formats import absmax_round
from ..models.config import ModelConfig
from ..models.decoder import KVCache
from ..models.rope import apply_rope, inverse_frequencies

__all__ = ["Int8KVCache", "SinkKVCache"]


def _to_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = absmax_round(x.float(), 8)
    return codes.to(torch.int8), scale


class Int8KVCache(KVCache):
    """`KVCache` with int8 storage; `update` returns the keys and values in `dtype`."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(config, batch_size, max_len, dtype=torch.int8, device=device)
        shape = (batch_size, config.num_key_value_heads, max_len, 1)
        layers = config.num_hidden_layers
        self.key_scales = [torch.zeros(shape, device=device) for _ in range(layers)]
        self.value_scales = [torch.zeros(shape, device=device) for _ in range(layers)]
        self.dtype = dtype

    def nbytes(self) -> int:
        return super().nbytes() + sum(
            t.numel() * t.element_size() for t in self.key_scales + self.value_scales
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.span(k.shape[2])
        for codes, scales, x in (
            (self.keys[layer], self.key_scales[layer], k),
            (self.values[layer], self.value_scales[layer], v),
        ):
            codes[:, :, start:end], scales[:, :, start:end] = _to_int8(x)
        keys = self.keys[layer][:, :, :end] * self.key_scales[layer][:, :, :end]
        values = self.values[layer][:, :, :end] * self.value_scales[layer][:, :, :end]
        return keys.to(self.dtype), values.to(self.dtype)


class SinkKVCache(KVCache):
    """A cache of `sinks` + `window` positions: the first `sinks` tokens stay for good, and
    once it is full, the oldest of the others make room for new ones (`evict` at a time).

    Models put a large share of their attention on the first tokens whatever they say (the
    "attention sinks" of StreamingLLM); a plain sliding window that drops them breaks the
    model, keeping four of them is enough. Positions are the ones in the cache, never the
    ones in the text, so they stay within what the model was trained on: when tokens leave,
    the keys behind them move forward and are turned back by as many positions (RoPE's angle
    is linear in the position; llama.cpp's context shift does the same). `evict` 1 is
    StreamingLLM; more drops that many at a time, so the cache is copied less often, as
    llama.cpp drops half its context when it fills.

    For a model whose every layer slides (Mistral's `sliding_window`), ``sinks=0`` and
    ``window=sliding_window`` lose nothing: no layer looks further back, so the cache stops
    growing at the window and decodes the tokens a full cache would
    (``generate(..., attention_window=W, attention_sinks=0)``).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        window: int,
        *,
        sinks: int = 4,
        evict: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if window < 1 or sinks < 0 or not 1 <= evict <= window:
            raise ValueError(
                f"need window >= 1, sinks >= 0 and 1 <= evict <= window, got window {window}, "
                f"sinks {sinks}, evict {evict}"
            )
        if sinks + window > config.max_position_embeddings:
            raise ValueError(
                f"sinks + window ({sinks + window}) exceeds the model's context "
                f"({config.max_position_embeddings}): positions in the cache must stay within it"
            )
        super().__init__(config, batch_size, sinks + window, dtype=dtype, device=device)
        self.sinks, self.window, self.evict = sinks, window, evict
        self.inv_freq = inverse_frequencies(config).to(device)
        self.evicted = 0  # tokens dropped so far
        self.latent = config.latent

    def make_room(self, count: int) -> None:
        overflow = self.length + count - self.max_len
        if overflow <= 0:
            return
        if count > self.window:
            raise ValueError(
                f"{count} new tokens at once do not fit a window of {self.window}: feed them "
                "in smaller pieces"
            )
        drop = max(overflow, self.evict)
        drop = min(drop, self.length - self.sinks)
        s, end = self.sinks, self.length
        angles = -drop * self.inv_freq
        cos = torch.cat((angles.cos(), angles.cos()))
        signed_sin = torch.cat((-angles.sin(), angles.sin()))
        for keys, values in zip(self.keys, self.values, strict=True):
            # Latent attention caches its latents as keys (no rotation in them) and its shared
            # rotated key as values: the second turns back, not the first.
            turned, moved = (values, keys) if self.latent else (keys, values)
            kept = turned[:, :, s + drop : end]
            turned[:, :, s : end - drop] = apply_rope(kept.float(), cos, signed_sin).to(
                turned.dtype
            )
            moved[:, :, s : end - drop] = moved[:, :, s + drop : end].clone()
        self.key_mask[:, s : end - drop] = self.key_mask[:, s + drop : end].clone()
        self.key_mask[:, end - drop :] = True
        # Positions are freed, no token is forgotten by a Mamba-2 state: not a cut back.
        self._length = end - drop
        self.evicted += drop
