"""The device catalogue and the roofline: bytes and operations counted from a real model's
tensors, the bound that applies, and what fits where."""

from __future__ import annotations

import pytest
import torch

from slmlab.devices import DEVICES, WEIGHT_BITS, Device, roofline, this_machine
from slmlab.models import DecoderLM, ModelConfig
from slmlab.models.budget import published_models

CONFIG = ModelConfig(
    vocab_size=1000, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip
SLOW_MEMORY = Device("test", 1, 10.0, 100.0, None, None, "made up")  # 10 GB/s, 100 TFLOPS


def _read_per_token(config: ModelConfig, bits: float) -> float:
    """Bytes a decode step reads, from the model's own tensors: every parameter once, and the
    embedding's table a second time when the head is tied to it (it is the head's matrix)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    params = sum(p.numel() for p in model.parameters())  # a tied table is counted once here
    embedding = model.model.embed_tokens.weight.numel()
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return (params - embedding - head + model.lm_head.weight.numel()) * bits / 8


@pytest.mark.parametrize("weights", ["fp32", "q8_0", "q4_0"])
@pytest.mark.parametrize("context", [0, 300])
def test_memory_bound_decode_is_bandwidth_over_bytes(weights, context) -> None:
    r = roofline(CONFIG, SLOW_MEMORY, weights=weights, kv="fp16", context=context)
    kv = 2 * CONFIG.num_hidden_layers * CONFIG.kv_size * 2 * context  # keys and values, 2 B
    expected = 10e9 / (_read_per_token(CONFIG, WEIGHT_BITS[weights]) + kv)
    assert r.decode_bound == "memory"
    assert r.decode_tokens_per_s == pytest.approx(expected, rel=1e-9)
    with torch.device("meta"):
        stored = sum(p.numel() for p in DecoderLM(CONFIG).parameters())
    assert r.weight_bytes == pytest.approx(stored * WEIGHT_BITS[weights] / 8)


def test_compute_bound_when_compute_is_scarce_and_prefill_counts_two_flops_a_weight() -> None:
    slow_compute = Device("test", 1, 1e6, 1e-6, None, None, "made up")  # 1 MFLOP/s
    r = roofline(CONFIG, slow_compute, weights="fp32", context=0, prompt=1)
    with torch.device("meta"):
        model = DecoderLM(CONFIG)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert r.decode_bound == r.prefill_bound == "compute"
    assert r.decode_tokens_per_s == pytest.approx(1e6 / (2 * matmul))


def test_prefill_is_compute_bound_and_decode_memory_bound_on_real_devices() -> None:
    smol = published_models()["SmolLM2-135M"].config
    for device in DEVICES.values():
        r = roofline(smol, device, weights="q4_0", context=512, prompt=512)
        assert r.decode_bound == "memory", device.name
        assert r.prefill_bound == "compute", device.name
        assert r.prefill_tokens_per_s > r.decode_tokens_per_s
    assert roofline(smol, DEVICES["raspberry-pi-5"], weights="fp32").fits


def test_what_fits_follows_weights_and_cache() -> None:
    big = ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
    )  # fmt: skip  (a 7B Llama)
    pi = DEVICES["raspberry-pi-5"]
    assert not roofline(big, pi, weights="fp16").fits
    assert roofline(big, pi, weights="q4_0", kv="fp16", context=2048).fits
    assert not roofline(big, pi, weights="q4_0", kv="fp32", context=4096, prompt=4096).fits


def test_catalogue_names_its_sources_and_measures_this_machine() -> None:
    wanted = {"raspberry-pi-5", "iphone-15-pro", "jetson-orin-nano-super", "macbook-air-m3",
              "x86-laptop", "h100-sxm", "h200-sxm"}  # fmt: skip
    assert wanted <= set(DEVICES)
    for device in DEVICES.values():
        assert device.source and device.memory_gb > 0 and device.bandwidth_gbs > 0
        assert device.fp32_tflops > 0
    here = this_machine()
    assert here.bandwidth_gbs > 0.5 and here.fp32_tflops > 0.001 and "measured" in here.source


def test_bad_precisions_are_named() -> None:
    with pytest.raises(ValueError, match="weights 'int3'"):
        roofline(CONFIG, SLOW_MEMORY, weights="int3")
    with pytest.raises(ValueError, match="kv 'int4'"):
        roofline(CONFIG, SLOW_MEMORY, kv="int4")


def test_the_gguf_formats_bits_are_ggmls_block_sizes() -> None:
    """A block format's bits a weight are its block's bytes over its weights, as ggml lays
    them out (the ``gguf`` package's table)."""
    gguf = pytest.importorskip("gguf")
    for name in ("q8_0", "q4_0", "q4_1", "q4_k"):
        weights, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
        assert WEIGHT_BITS[name] == 8 * size / weights, name
