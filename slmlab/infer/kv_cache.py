"""An int8 KV cache: a quarter of the bytes of an fp32 cache, for long contexts and big batches.

The cache grows with every token of every row: for a small model with a long context it can
outgrow the weights (chapter 01 counts it). Each cached key and value vector (one per row, head
and position) is stored as int8 with its own fp32 scale, absmax / 127; attention reads them
back dequantized. One scale per vector of head_dim values costs 32/head_dim extra bits.
"""

from __future__ import annotations

import torch

from ..layers.formats import absmax_round
from ..models.config import ModelConfig
from ..models.decoder import KVCache

__all__ = ["Int8KVCache"]


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
