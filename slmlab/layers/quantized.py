"""The quantized layers a checkpoint can hold, and the config.json section that records them.

`slmlab.quant` makes them (`quantize_`, GPTQ, AWQ, QAT); `slmlab.checkpoint` saves and loads
them. They sit below both, beside the number formats they store (`formats`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..models.swap import replace_module
from .formats import (
    _FP8,
    QuantizedTensor,
    absmax_round,
    codebook,
    dequantize,
    pack_codes,
    unpack_codes,
)

__all__ = [
    "QuantEmbedding",
    "QuantLinear",
    "apply_quantization_config",
    "fake_quantize_activations",
    "quantization_config",
    "quantized_modules",
]


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Each token's activations rounded to `bits`-bit integers with its own absmax scale."""
    codes, scale = absmax_round(x, bits)
    return codes * scale


def _packed(codes: torch.Tensor, bits: int) -> bool:
    """Whether a layer stores these codes packed: under 8 bits, when the row packs exactly."""
    return bits < 8 and codes.dtype == torch.uint8 and codes.shape[-1] * bits % 8 == 0


class QuantLinear(nn.Module):
    """A linear layer with a quantized weight (and, for W8A8, quantized activations)."""

    def __init__(
        self,
        q: QuantizedTensor,
        bias: torch.Tensor | None,
        *,
        activation_bits: int | None = None,
        outlier_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.fmt, self.bits, self.group_size = q.fmt, q.bits, q.group_size
        self.out_features, self.in_features = q.shape
        self.activation_bits, self.outlier_threshold = activation_bits, outlier_threshold
        # Integer codes under 8 bits are packed tightly (two 4-bit codes a byte, eight 3-bit
        # codes in three bytes), so the buffer, the checkpoint and the memory are bits/8 bytes.
        packed = _packed(q.codes, self.bits)
        self.register_buffer("codes", pack_codes(q.codes, self.bits) if packed else q.codes)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def empty(
        cls, out_features: int, in_features: int, spec: dict, *, bias: bool = False
    ) -> QuantLinear:
        """A layer of the shape and `spec` (see `spec()`) whose tensors a checkpoint fills."""
        group = spec["group_size"]
        if in_features % group:
            raise ValueError(f"group_size {group} does not divide the input width {in_features}")
        code_dtype = _FP8.get(spec["fmt"], torch.uint8)
        q = QuantizedTensor(
            torch.zeros(out_features, in_features, dtype=code_dtype),
            torch.ones(out_features, in_features // group),
            None
            if spec["symmetric"]
            else torch.zeros(out_features, in_features // group, dtype=torch.uint8),
            spec["fmt"],
            spec["bits"],
            group,
        )
        return cls(
            q,
            torch.zeros(out_features) if bias else None,
            activation_bits=spec["activation_bits"],
            outlier_threshold=spec["outlier_threshold"],
        )

    def quantized(self, rows: torch.Tensor | slice | None = None) -> QuantizedTensor:
        """The weight's codes (unpacked) and scales: all rows, or only those `rows` index."""
        codes, scales, zeros = self.codes, self.scales, self.zeros
        if rows is not None:  # select before unpacking: an embedding lookup reads few rows
            codes, scales = codes[rows], scales[rows]
            zeros = None if zeros is None else zeros[rows]
        if codes.dtype == torch.uint8 and codes.shape[-1] != self.in_features:  # packed
            codes = unpack_codes(codes, self.bits)
        return QuantizedTensor(codes, scales, zeros, self.fmt, self.bits, self.group_size)

    def dequantized_weight(
        self, dtype: torch.dtype = torch.float32, rows: slice | None = None
    ) -> torch.Tensor:
        """The weight (out, in) as real numbers, or only its `rows`."""
        if self.fmt in ("nf4", "fp4") and self.codes.shape[-1] * 2 == self.in_features:
            # Packed 4-bit codes read a byte at a time: one lookup gives both of its values
            # (what QLoRA does twice a step for every layer; unpacking first is 10x slower).
            codes, scales = self.codes, self.scales
            if rows is not None:
                codes, scales = codes[rows], scales[rows]
            pairs = _byte_values(self.fmt, scales.device)[codes.long()]
            values = pairs.reshape(len(codes), -1, self.group_size)
            weight = values * scales[..., None]
            return weight.reshape(len(codes), self.in_features).to(dtype)
        return dequantize(self.quantized(rows), dtype)

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this layer (see `slmlab.quant.checkpoint`)."""
        return {
            "fmt": self.fmt,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.zeros is None,
            "activation_bits": self.activation_bits,
            "outlier_threshold": self.outlier_threshold,
        }

    def int4_operands(self) -> kernels.Int4Operands | None:
        """The packed tensors of a 4-bit weight, for the fused decode step (`slmlab.kernels`),
        when this layer computes exactly x times their dequantization (plus its bias)."""
        if (
            self.fmt == "int"
            and self.bits == 4
            and self.activation_bits is None
            and self.codes.shape[-1] * 2 == self.in_features  # packed
        ):
            return kernels.Int4Operands(self.codes, self.scales, self.zeros, self.group_size)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = self._quantize_input(x)
        elif self.fmt == "int" and self.bits == 4:
            y = kernels.int4_linear(x, self.codes, self.scales, self.zeros, self.group_size)
            if y is not None:
                return y if self.bias is None else y + self.bias
        # The reference path, and the oracle of every kernel: dequantize, then multiply.
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: training through this layer
            y = _FrozenQuantMatmul.apply(x, self)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        # Integer activations times integer weights, each with its scale, is the same product
        # as these rounded real numbers times the dequantized weight: computed that way here.
        if self.outlier_threshold is None:
            return fake_quantize_activations(x, self.activation_bits)
        # LLM.int8: the input features (columns) where some token reaches the threshold stay in
        # full precision, times the dequantized weight columns; a handful of features carry the
        # huge values. The rest are rounded per token, with a scale that ignores the outlying
        # values themselves (bitsandbytes' int8_vectorwise_quant, which the tests compare with).
        big = x.abs() >= self.outlier_threshold
        outlier_features = big.reshape(-1, x.shape[-1]).any(0)
        codes, scale = absmax_round(x, self.activation_bits, ignore=big)
        regular = codes * scale
        return torch.where(outlier_features, x, regular)

    def extra_repr(self) -> str:
        extra = f", activation_bits={self.activation_bits}" if self.activation_bits else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"fmt={self.fmt}, bits={self.bits}, group_size={self.group_size}{extra}"
        )


@functools.cache
def _byte_values(fmt: str, device: torch.device) -> torch.Tensor:
    """(256, 2): the two codebook values a packed byte holds, the low nibble's first
    (`pack_codes`' order)."""
    table = codebook(fmt).to(device)
    byte = torch.arange(256, device=device)
    return torch.stack([table[byte & 15], table[byte >> 4]], dim=-1)


# A frozen quantized layer in training dequantizes at most this many bytes of its weight at a
# time: a block's layers whole, a tied output head (49,152 rows of SmolLM2, 108 MiB in fp32) in
# slices of rows.
FROZEN_DEQUANTIZE_BYTES = 16 * 2**20


def _row_slices(layer: QuantLinear, dtype: torch.dtype) -> list[slice]:
    step = max(1, FROZEN_DEQUANTIZE_BYTES // (layer.in_features * dtype.itemsize))
    return [slice(a, min(a + step, layer.out_features)) for a in range(0, layer.out_features, step)]


class _FrozenQuantMatmul(torch.autograd.Function):
    """``x Wᵀ`` for a layer's frozen quantized W, whose backward dequantizes W again instead of
    keeping it: the gradient reaches the input (and the LoRA update before it) while memory
    holds only the codes, as bitsandbytes' 4-bit matmul does. W itself gets no gradient. A W
    larger than `FROZEN_DEQUANTIZE_BYTES` is dequantized a slice of rows at a time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        parts = _row_slices(layer, x.dtype)
        if len(parts) == 1:
            return F.linear(x, layer.dequantized_weight(x.dtype))
        y = x.new_empty(*x.shape[:-1], layer.out_features)
        for rows in parts:
            y[..., rows] = F.linear(x, layer.dequantized_weight(x.dtype, rows))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        parts = _row_slices(layer, grad.dtype)
        if len(parts) == 1:
            return grad @ layer.dequantized_weight(grad.dtype), None
        out = grad[..., parts[0]] @ layer.dequantized_weight(grad.dtype, parts[0])
        for rows in parts[1:]:
            out += grad[..., rows] @ layer.dequantized_weight(grad.dtype, rows)
        return out, None


class QuantEmbedding(nn.Module):
    """A token embedding with integer rows: a lookup dequantizes only the rows it reads."""

    def __init__(self, q: QuantizedTensor) -> None:
        super().__init__()
        self.linear = QuantLinear(q, None)  # (vocab, dim): the same codes serve a tied head
        self.num_embeddings, self.embedding_dim = q.shape

    def as_head(self) -> QuantLinear:
        """The output layer of a tied model: the same codes, as a linear layer."""
        return self.linear

    def int4_operands(self) -> kernels.Int4Operands | None:
        """The packed rows, for the fused decode step's lookup (`slmlab.kernels`), when 4-bit."""
        return self.linear.int4_operands()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize(self.linear.quantized(input_ids.reshape(-1)))
        return rows.reshape(*input_ids.shape, self.embedding_dim)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Every `QuantLinear` of `model` by name (what a quantized checkpoint records)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantization_config(model: nn.Module) -> dict | None:
    """The ``quantization_config`` section a checkpoint of `model` records, or None."""
    layers = quantized_modules(model)
    if not layers:
        return None
    embedding = next((m for m in model.modules() if isinstance(m, QuantEmbedding)), None)
    return {
        "quant_method": "slmlab",
        "layers": {
            # A base layer under a LoRA update (QLoRA) is recorded by the base model's name;
            # the adapter goes beside it (`slmlab.layers.lora`).
            name.replace(".base_layer", ""): layer.spec()
            for name, layer in layers.items()
            if embedding is None or layer is not embedding.linear
        },
        "embedding": None if embedding is None else embedding.linear.spec(),
    }


def apply_quantization_config(model: nn.Module, section: dict) -> None:
    """Give `model` the quantized layers that `section` (from `quantization_config`) names, with
    placeholder tensors of the right shapes, for a checkpoint's tensors to fill."""
    for name, spec in section["layers"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_config names {name!r}, which is not a linear layer")
        layer = QuantLinear.empty(
            linear.out_features, linear.in_features, spec, bias=linear.bias is not None
        )
        replace_module(model, name, layer)
    if section.get("embedding") is not None:
        table = model.get_submodule("model.embed_tokens")
        vocab, dim = table.weight.shape
        embedding = QuantEmbedding.__new__(QuantEmbedding)
        nn.Module.__init__(embedding)
        embedding.linear = QuantLinear.empty(vocab, dim, section["embedding"])
        embedding.num_embeddings, embedding.embedding_dim = vocab, dim
        replace_module(model, "model.embed_tokens", embedding)  # re-ties a tied head
