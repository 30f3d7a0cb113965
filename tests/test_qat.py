"""Quantization-aware training: the straight-through gradient, conversion to the very codes the
forward pass used, and ternary (BitNet b1.58) training through the trainer, resumable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slmlab
from slmlab.quant import QuantConfig, QuantLinear, dequantize, quantize
from slmlab.quant.qat import FakeQuantLinear, convert_qat_, prepare_qat_, train_qat
from slmlab.train import build_data

from .test_train import TINY

TERNARY = {"fmt": "ternary", "bits": 2, "group_size": None, "activation_bits": 8}


def test_the_gradient_passes_straight_through_the_rounding() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    config = QuantConfig(bits=3, group_size=16)
    rounded = dequantize(quantize(layer.weight, "int", 3, group_size=16))
    reference = nn.Linear(32, 16)  # a plain layer holding the rounded weight
    with torch.no_grad():
        reference.weight.copy_(rounded)
        reference.bias.copy_(layer.bias)
    model = prepare_qat_(nn.Sequential(layer), config)
    assert isinstance(model[0], FakeQuantLinear)
    x = torch.randn(5, 32)
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad)  # d/dŵ, applied to w
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize(
    "config",
    [QuantConfig(bits=4, group_size=16), QuantConfig(**TERNARY)],
    ids=["int4", "ternary-a8"],
)
def test_conversion_keeps_what_training_computed(config) -> None:
    torch.manual_seed(0)
    model = prepare_qat_(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)), config)
    x = torch.randn(6, 32)
    with torch.no_grad():
        before = model(x)
        convert_qat_(model)
        after = model(x)
    assert isinstance(model[0], QuantLinear) and model[0].activation_bits == config.activation_bits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_qat_configs_that_cannot_train_are_refused() -> None:
    with pytest.raises(ValueError, match="fixed grid"):
        prepare_qat_(nn.Sequential(nn.Linear(8, 8)), QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="call prepare_qat_ first"):
        convert_qat_(nn.Sequential(nn.Linear(8, 8)))


def test_ternary_training_runs_through_the_trainer_and_resumes_exactly(tmp_path) -> None:
    config = TINY.replace(qat=TERNARY)
    data = build_data(config)
    straight = train_qat(config, tmp_path / "straight", progress=False, data=data)
    train_qat(config, tmp_path / "resumed", progress=False, data=data, max_steps=5)
    resumed = train_qat(config, tmp_path / "resumed", progress=False, data=data, resume=True)
    assert resumed.train_loss == straight.train_loss
    model = slmlab.load(straight.checkpoint)  # the latent weights
    convert_qat_(prepare_qat_(model, QuantConfig(**TERNARY)))
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.fmt == "ternary"
    assert set(layer.quantized().codes.unique().tolist()) <= {1, 2, 3}  # −1, 0, +1
    assert layer.codes.numel() == layer.in_features * layer.out_features // 4  # 2 bits each
