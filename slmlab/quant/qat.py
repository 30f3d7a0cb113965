"""Quantization-aware training: train the model through the rounding it will be stored with.

Rounding after training (RTN, GPTQ) can only choose good codes for weights that were learnt
without them. Training *through* the rounding lets the weights settle where rounding costs
least. The forward pass uses the rounded weight (and, for W8A8 configs, rounded activations);
rounding has zero gradient almost everywhere, so the backward pass pretends it is the
identity: the *straight-through estimator*, ŵ = w + (round(w) − w).detach(). The optimizer
keeps updating the real-valued ("latent") weights.

BitNet b1.58 is this with ternary weights ({−1, 0, +1} × mean |w|) and int8 activations,
trained from scratch: the zoo's ``stories-1m-ternary`` recipe. After training, `convert_qat_`
swaps each layer for the `QuantLinear` holding exactly the codes the forward pass used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.formats import dequantize, quantize
from ..layers.quantized import QuantLinear, fake_quantize_activations
from ..models.swap import linear_layers, replace_module
from ..train.config import TrainConfig
from ..train.loop import TrainResult
from ..train.loop import train as _train
from .linear import QuantConfig

__all__ = ["FakeQuantLinear", "convert_qat_", "prepare_qat_", "train_qat"]


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """`rounded` forward, identity backward."""
    return x + (rounded - x).detach()


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose forward rounds its weight to
    `config`'s grid and, for W8A8 configs, its input per token; gradients pass straight through."""

    config: QuantConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        q = quantize(self.weight, c.fmt, c.bits, group_size=c.group_size, symmetric=c.symmetric)
        weight = _straight_through(self.weight, dequantize(q, self.weight.dtype))
        if c.activation_bits is not None:
            x = _straight_through(x, fake_quantize_activations(x, c.activation_bits))
        return F.linear(x, weight, self.bias)


def prepare_qat_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Make every linear layer that `quantize_` would quantize a `FakeQuantLinear`, in place.

    The parameters are the same tensors, so an optimizer built before or after sees the same
    ones, and checkpoints hold the latent weights (a run resumes exactly).
    """
    if config.method not in ("rtn", "smoothquant") or config.embedding_bits is not None:
        raise ValueError(
            "quantization-aware training rounds to a fixed grid: use method='rtn' (weights) or "
            "'smoothquant' (W8A8), without embedding_bits"
        )
    for _, module in linear_layers(model, "all", skip=config.skip):
        if type(module) is not nn.Linear:
            continue
        module.__class__ = FakeQuantLinear  # same parameters, new forward
        module.config = config
    return model


def convert_qat_(model: nn.Module) -> nn.Module:
    """Replace each `FakeQuantLinear` by the `QuantLinear` of the same codes, in place: the
    model computes exactly what it computed in training's forward pass."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        raise ValueError("convert_qat_ found no FakeQuantLinear layers: call prepare_qat_ first")
    for name, layer in layers:
        c = layer.config  # the very call the forward pass made: the same codes
        q = quantize(layer.weight, c.fmt, c.bits, group_size=c.group_size, symmetric=c.symmetric)
        replace_module(model, name, QuantLinear(q, layer.bias, activation_bits=c.activation_bits))
    return model


def train_qat(config: TrainConfig, out, **kwargs) -> TrainResult:
    """`slmlab.train.train` for a config with `qat` (its `QuantConfig` fields): the model's
    linear layers round in every forward pass (`prepare_qat_`) while the optimizer updates the
    real-valued weights underneath. A config without `qat` trains as it would anyway."""
    if config.qat is None:
        return _train(config, out, **kwargs)
    qat = QuantConfig.from_table(config.qat, "qat")
    return _train(config, out, prepare=lambda model: prepare_qat_(model, qat), **kwargs)
