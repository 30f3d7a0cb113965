"""Calibrated methods (GPTQ, AWQ, SmoothQuant, LLM.int8) on whole models, bitsandbytes as the
reference for LLM.int8, and quantized checkpoints that load back to identical outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import slmlab
from slmlab.checkpoint import CheckpointError
from slmlab.models import DecoderLM, ModelConfig
from slmlab.quant import QuantConfig, QuantLinear, quantize_
from slmlab.quant.calibrate import block_inputs, blocks, sequential_hessians
from slmlab.quant.gptq import layer_error
from slmlab.quant.smoothing import awq_scales, smooth_


def small_model(tied: bool = True) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tied,
    )
    model = DecoderLM(config).eval()
    with torch.no_grad():  # outlier features, as trained models have: channel 5 is loud
        for block in model.model.layers:
            block.input_layernorm.weight[5] = 30.0
            block.post_attention_layernorm.weight[5] = 30.0
    return model


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


def test_hooks_see_the_inputs_of_every_layer_block_by_block(calibration) -> None:
    model = small_model()
    first = blocks(model)[0]
    (x,) = block_inputs(model, calibration, first, [first.mlp.down_proj])
    assert x.shape == (calibration.numel(), 128)
    targets = {"model.layers.1.mlp.down_proj": model.model.layers[1].mlp.down_proj}
    [(_, _, hessian)] = list(sequential_hessians(model, calibration, targets))
    (x,) = block_inputs(model, calibration, blocks(model)[1], [model.model.layers[1].mlp.down_proj])
    torch.testing.assert_close(hessian, 2 * x.double().T @ x.double() / x.shape[0])


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_smoothing_folds_into_an_identical_model(method, calibration) -> None:
    model, reference = small_model(), small_model()
    config = QuantConfig(method=method, bits=8 if method == "smoothquant" else 4, group_size=32)
    smooth_(model, calibration, config)
    torch.testing.assert_close(model(calibration), reference(calibration), rtol=1e-4, atol=1e-4)
    if method == "smoothquant":  # the loud channel's activations were tamed
        norm = model.model.layers[0].input_layernorm.weight
        assert norm[5] < 0.5 * reference.model.layers[0].input_layernorm.weight[5]


def test_awq_scales_never_round_worse_than_plain_rounding() -> None:
    from slmlab.quant import dequantize, quantize

    torch.manual_seed(0)
    inputs = torch.randn(512, 64)
    inputs[:, :3] *= 20
    layer = nn.Linear(64, 48, bias=False).requires_grad_(False)

    def output_error(s: torch.Tensor) -> float:
        rounded = dequantize(quantize(layer.weight * s, "int", 4, group_size=32)) / s
        return float((inputs @ (rounded - layer.weight).T).pow(2).mean())

    s = awq_scales(inputs, [layer], bits=4, group_size=32, symmetric=True)
    assert output_error(s) < 0.9 * output_error(torch.ones(64))


def test_gptq_model_beats_round_to_nearest_on_its_calibration(calibration) -> None:
    model = small_model()
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets.pop("lm_head")
    hessians = {n: h for n, _, h in sequential_hessians(model, calibration, targets)}
    errors = {}
    for method in ("rtn", "gptq"):
        quantized = quantize_(
            copy.deepcopy(model),
            QuantConfig(method=method, bits=3, group_size=32),
            calibration=calibration,
        )
        layer = quantized.get_submodule("model.layers.0.self_attn.q_proj")
        weight = targets["model.layers.0.self_attn.q_proj"].weight.double()
        errors[method] = layer_error(
            weight, layer.dequantized_weight().double(), hessians["model.layers.0.self_attn.q_proj"]
        )
    assert errors["gptq"] < errors["rtn"]


def test_calibrated_methods_need_calibration() -> None:
    with pytest.raises(ValueError, match="gptq needs calibration data"):
        quantize_(small_model(), QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match="int8 method"):
        QuantConfig(method="smoothquant", bits=4)
    with pytest.raises(ValueError, match="unknown method"):
        QuantConfig(method="magic")
    with pytest.raises(ValueError, match="calibration must be a"):
        quantize_(small_model(), QuantConfig(method="gptq"), calibration=torch.rand(2, 8))
    model = small_model()
    widest = max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match=f"fewer than the {widest} inputs"):  # XᵀX singular
        quantize_(
            model, QuantConfig(method="gptq"), calibration=torch.zeros(1, 4, dtype=torch.long)
        )


def test_llm_int8_matches_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference for LLM.int8")
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():  # bitsandbytes computes in fp16: give it numbers fp16 holds exactly
        layer.weight.copy_(layer.weight.half().float())
        layer.bias.copy_(layer.bias.half().float())
    theirs = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(layer.state_dict())
    theirs = theirs.to("cpu").eval()
    their_codes = theirs.weight.data.clone()
    ours = quantize_(
        nn.Sequential(layer), QuantConfig(method="llm_int8", bits=8, group_size=None, skip=())
    )[0]
    assert torch.equal(ours.codes.int() - 128, their_codes.int())  # stored offset by 128
    x = torch.randn(7, 64)
    x[:, [3, 40]] *= 25  # two outlier features
    x = x.half().float()
    with torch.no_grad():
        exact, mine, reference = layer(x), ours(x), theirs(x).float()
    assert (mine - exact).abs().max() > 1e-3  # activations really were rounded...
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-4)  # ...as bitsandbytes does


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(method="rtn", bits=4, group_size=32, symmetric=False, embedding_bits=8),
        QuantConfig(method="gptq", bits=4, group_size=32, act_order=True, embedding_bits=4),
        QuantConfig(method="rtn", fmt="nf4", bits=4, group_size=64),
        QuantConfig(method="rtn", fmt="fp8_e4m3", bits=8, group_size=None),
        QuantConfig(method="smoothquant", bits=8, group_size=None),
        QuantConfig(method="llm_int8", bits=8, group_size=None),
        QuantConfig(method="gptq", bits=3, group_size=32),
    ],
    ids=["rtn-int4-emb8", "gptq-int4-emb4", "nf4", "fp8", "smoothquant", "llm_int8", "gptq-int3"],
)
def test_quantized_checkpoint_loads_to_identical_outputs(config, calibration, tmp_path) -> None:
    model = quantize_(small_model(), config, calibration=calibration)
    slmlab.save(model, tmp_path / "q")
    loaded = slmlab.load(tmp_path / "q")
    assert type(loaded.lm_head) is type(model.lm_head)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == sum(
        isinstance(m, QuantLinear) for m in model.modules()
    )
    with torch.no_grad():
        assert torch.equal(loaded(calibration), model(calibration))
    section = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert section["quant_method"] == "slmlab"


def test_a_4bit_checkpoint_is_about_an_eighth_of_fp32(tmp_path) -> None:
    model = small_model()
    slmlab.save(model, tmp_path / "fp32")
    quantize_(model, QuantConfig(bits=4, group_size=64, embedding_bits=4))
    slmlab.save(model, tmp_path / "int4")
    size = {
        name: (tmp_path / name / "model.safetensors").stat().st_size for name in ("fp32", "int4")
    }
    # 4 bits of code plus 32 bits of scale per 64 weights is 4.5 bits; norms stay fp32
    assert size["int4"] < 0.16 * size["fp32"]


def test_malformed_quantization_config_is_named(tmp_path) -> None:
    model = quantize_(small_model(), QuantConfig(bits=4, group_size=32))
    slmlab.save(model, tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["group_size"] = 48
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"malformed quantization_config.*does not divide"):
        slmlab.load(tmp_path / "q")
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="slmlab loads its own quantized"):
        slmlab.load(tmp_path / "q")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cli_quantize_writes_a_checkpoint_that_loads(
    method, story_model, story_tokenizer, tmp_path, capsys
) -> None:
    from slmlab.cli import main
    from slmlab.quant import calibration_tokens

    slmlab.save(story_model, tmp_path / "fp32", story_tokenizer)
    args = ["quantize", str(tmp_path / "fp32"), "--method", method, "--bits", "4"]
    args += ["--group-size", "16", "--calibration-rows", "4", "--seq-len", "64"]
    assert main([*args, "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert "of" in capsys.readouterr().out  # the size, and its share of the original
    loaded = slmlab.load(tmp_path / "q")
    config = QuantConfig(method=method, bits=4, group_size=16)
    calibration = calibration_tokens(story_tokenizer, rows=4, seq_len=64)
    expected = quantize_(copy.deepcopy(story_model), config, calibration=calibration)
    with torch.no_grad():
        assert torch.equal(loaded(calibration), expected(calibration))
    assert calibration.shape == (4, 64)


def test_cli_quantize_reports_a_bad_group_size(story_model, story_tokenizer, tmp_path) -> None:
    from slmlab.cli import main

    slmlab.save(story_model, tmp_path / "fp32", story_tokenizer)
    with pytest.raises(SystemExit) as stop:
        main(
            ["quantize", str(tmp_path / "fp32"), "--group-size", "20", "--out", str(tmp_path / "q")]
        )
    assert stop.value.code == 1


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_a_model_on_bitsandbytes_4bit_layers_computes_what_slmlab_computes(kind) -> None:
    """(Its int8 layers compute in fp16, which inside a model moves activations by as much as
    rounding them to int8 does: LLM.int8 is compared layer by layer above, on fp16 inputs.)"""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference")
    from slmlab.quant.bnb import bitsandbytes_

    model = small_model(tied=False)
    theirs = bitsandbytes_(copy.deepcopy(model), kind)
    ours = quantize_(copy.deepcopy(model), QuantConfig(fmt=kind, bits=4, group_size=64))
    assert sum(type(m).__name__ == "Linear4bit" for m in theirs.modules()) == 14
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, mine, reference = model(ids), ours(ids), theirs(ids)
    rounding = (exact - mine).abs().max()
    assert rounding > 1e-2  # 4 bits really changed the model...
    # ...and bitsandbytes changed it the same way, up to its block scales, which it keeps in
    # bf16 on CPU (slmlab keeps fp32; test_quant.py compares the codes themselves exactly).
    assert (reference - mine).abs().max() < 0.1 * rounding
