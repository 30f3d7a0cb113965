"""The device catalogue and the roofline: bytes and operations counted from a real model's
tensors, the bound that applies, and what fits where."""

from __future__ import annotations

import pytest
import torch

from slmlab.devices import (
    DEVICES,
    WEIGHT_BITS,
    Device,
    fixed_cost_and_share,
    roofline,
    this_machine,
)
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


def test_weights_that_fit_in_a_cache_level_are_read_at_its_bandwidth() -> None:
    """The cache-aware roofline: a step's bytes come from the smallest level that holds them."""
    read = _read_per_token(CONFIG, 32)  # about 2 MB in fp32
    levels = ((read / 2 / 2**20, 500.0), (2 * read / 2**20, 100.0), (1e6, 5.0))
    cached = Device("test", 1, 10.0, 100.0, None, None, "made up", cache_bandwidths=levels)
    r = roofline(CONFIG, cached, weights="fp32", context=0)
    assert r.decode_bound == "memory" and r.decode_bandwidth_gbs == 100.0
    assert r.decode_from_cache  # 10x memory's rate
    assert r.decode_tokens_per_s == pytest.approx(100e9 / read, rel=1e-9)
    barely = Device("test", 1, 80.0, 100.0, None, None, "made up", cache_bandwidths=levels)
    assert not roofline(CONFIG, barely, context=0).decode_from_cache  # 1.25x: memory's, nearly
    # a level slower than main memory does not slow it down; none listed: main memory
    assert cached.bandwidth_for(1e12) == 10.0 and cached.bandwidth_for(read * 3) == 10.0
    assert roofline(CONFIG, SLOW_MEMORY, context=0).decode_bandwidth_gbs == 10.0
    assert not roofline(CONFIG, SLOW_MEMORY, context=0).decode_from_cache


def test_four_bit_decode_is_bound_by_unpacking_where_that_is_slower_than_reading() -> None:
    """Each matrix takes its weights over the rate for rows of its inputs: CONFIG's down
    projections (rows of 384) at the second rate, every other matrix (rows of 128) the first."""
    with torch.device("meta"):
        model = DecoderLM(CONFIG)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    down = sum(m.weight.numel() for m in linear if m.in_features == CONFIG.intermediate_size)
    rest = sum(m.weight.numel() for m in linear) - down
    rates = ((128, 0.001), (384, 0.002))  # billions of weights/s
    slow_unpack = Device("test", 1, 10.0, 100.0, None, None, "made up", int4_rates=rates)
    for weights in ("int4", "q4_0", "q4_k"):
        r = roofline(CONFIG, slow_unpack, weights=weights, context=0)
        assert r.decode_bound == "unpacking"
        assert r.decode_tokens_per_s == pytest.approx(1 / (rest / 1e6 + down / 2e6))
    # other formats, or a device that has not measured the rates, are read at bandwidth
    assert roofline(CONFIG, slow_unpack, weights="q8_0", context=0).decode_bound == "memory"
    fast = Device("test", 1, 10.0, 100.0, None, None, "made up", int4_rates=((64, 1e6),))
    assert roofline(CONFIG, fast, weights="q4_0", context=0).decode_bound == "memory"
    assert roofline(CONFIG, SLOW_MEMORY, weights="q4_0", context=0).decode_bound == "memory"


def test_the_four_bit_rate_between_measured_widths_is_interpolated_on_a_log_scale() -> None:
    device = Device("test", 1, 10.0, 100.0, None, None, "made up",
                    int4_rates=((256, 10.0), (1024, 30.0), (4096, 40.0)))  # fmt: skip
    assert device.int4_rate(512) == pytest.approx(20.0)
    assert device.int4_rate(2048) == pytest.approx(35.0)
    assert device.int4_rate(1024) == 30.0
    assert device.int4_rate(64) == 10.0 and device.int4_rate(1 << 16) == 40.0
    assert SLOW_MEMORY.int4_rate(512) is None


def test_a_files_own_bits_replace_the_formats() -> None:
    """Q4_K's matrices whose rows are not whole super-blocks fall back to Q5_0 (5.5 bits)."""
    r = roofline(CONFIG, SLOW_MEMORY, weights="q4_k", context=0, bits=5.5)
    assert r.decode_tokens_per_s == pytest.approx(10e9 / _read_per_token(CONFIG, 5.5))
    with pytest.raises(ValueError, match="bits 0"):
        roofline(CONFIG, SLOW_MEMORY, weights="q4_k", bits=0)


def test_a_runtimes_fixed_cost_a_token_is_added_to_the_bound() -> None:
    """Time a token = the bound's time + the overhead; the bound is 'overhead' where that is
    the longer; prefill is left alone (one pass for the whole prompt)."""
    bare = roofline(CONFIG, SLOW_MEMORY, context=0)
    bound_s = _read_per_token(CONFIG, 32) / 10e9
    small = roofline(CONFIG, SLOW_MEMORY, context=0, overhead_s=bound_s / 4)
    assert small.decode_bound == "memory"
    assert 1 / small.decode_tokens_per_s == pytest.approx(1.25 * bound_s, rel=1e-9)
    large = roofline(CONFIG, SLOW_MEMORY, context=0, overhead_s=3 * bound_s)
    assert large.decode_bound == "overhead"
    assert 1 / large.decode_tokens_per_s == pytest.approx(4 * bound_s, rel=1e-9)
    assert large.prefill_tokens_per_s == bare.prefill_tokens_per_s
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="overhead_s"):
            roofline(CONFIG, SLOW_MEMORY, overhead_s=bad)


def test_a_runtimes_share_of_the_ceiling_divides_the_bounds_time_alone() -> None:
    """Time a token = the bound's time / share + the overhead: the fixed cost is not scaled,
    the bound's label follows the scaled time, prefill is left alone."""
    bound_s = _read_per_token(CONFIG, 32) / 10e9
    bare = roofline(CONFIG, SLOW_MEMORY, context=0)
    half = roofline(CONFIG, SLOW_MEMORY, context=0, overhead_s=bound_s, share=0.5)
    assert half.decode_bound == "memory"  # 2 bound_s of reading against bound_s of fixed cost
    assert 1 / half.decode_tokens_per_s == pytest.approx(3 * bound_s, rel=1e-9)
    assert half.prefill_tokens_per_s == bare.prefill_tokens_per_s
    more = roofline(CONFIG, SLOW_MEMORY, context=0, overhead_s=bound_s, share=2.0)
    assert more.decode_bound == "overhead"
    assert 1 / more.decode_tokens_per_s == pytest.approx(1.5 * bound_s, rel=1e-9)
    for bad in (0.0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="share"):
            roofline(CONFIG, SLOW_MEMORY, share=bad)


def test_two_models_give_back_the_fixed_cost_and_share_that_timed_them() -> None:
    """Times made through the roofline itself by a known fixed cost a block (times each
    model's blocks) and share come back as both; with equal blocks it is the line through two
    points; one model alone gives share 1; a fixed cost is never negative."""
    small = ModelConfig(**{**CONFIG.__dict__, "num_hidden_layers": 1, "vocab_size": 100})
    fixed, share = 2e-4, 0.7

    def timed(config: ModelConfig, blocks: int) -> tuple[float, float, int]:
        ceiling = roofline(config, SLOW_MEMORY, context=0)
        r = roofline(config, SLOW_MEMORY, context=0, overhead_s=fixed * blocks, share=share)
        return 1 / ceiling.decode_tokens_per_s, 1 / r.decode_tokens_per_s, blocks

    times = [timed(small, 1), timed(CONFIG, CONFIG.num_hidden_layers)]
    assert CONFIG.num_hidden_layers > 1
    assert fixed_cost_and_share(*times) == pytest.approx((fixed, share), rel=1e-9)
    (c0, t0, _), (c1, t1, _) = timed(small, 3), timed(CONFIG, 3)
    line = fixed_cost_and_share((c0, t0, 1), (c1, t1, 1))  # the fixed cost of three blocks
    assert line == pytest.approx(((t0 - c0 / share), (c1 - c0) / (t1 - t0)), rel=1e-9)
    assert line == pytest.approx((3 * fixed, share), rel=1e-9)
    assert fixed_cost_and_share(times[0]) == pytest.approx((times[0][1] - times[0][0], 1.0))
    assert fixed_cost_and_share((1e-3, 5e-4, 2)) == (0.0, 1.0)  # faster than its ceiling
    assert fixed_cost_and_share((1e-6, 1e-3, 2), (1e-6, 2e-3, 4))[1] == 1.0  # reads no more


def test_a_prompts_pass_has_its_own_fixed_cost_and_share_and_two_models_give_them_back() -> None:
    """Time of a pass = the compute bound's time / prefill_share + prefill_overhead_s, decode
    untouched, the bound 'overhead' where that is the longer; times made so on two models of
    different widths (and blocks) give back the fixed cost a block and the share."""
    slow_compute = Device("test", 1, 1e6, 1e-6, None, None, "made up")  # 1 MFLOP/s
    bare = roofline(CONFIG, slow_compute, context=0, prompt=64)
    pass_s = 64 / bare.prefill_tokens_per_s
    r = roofline(CONFIG, slow_compute, context=0, prompt=64, prefill_overhead_s=pass_s / 4,
                 prefill_share=0.5)  # fmt: skip
    assert 64 / r.prefill_tokens_per_s == pytest.approx(2.25 * pass_s, rel=1e-9)
    assert r.prefill_bound == "compute" and r.decode_tokens_per_s == bare.decode_tokens_per_s
    slow = roofline(CONFIG, slow_compute, context=0, prompt=64, prefill_overhead_s=3 * pass_s)
    assert slow.prefill_bound == "overhead"
    for field, bad in (("prefill_overhead_s", -1.0), ("prefill_share", 0.0)):
        with pytest.raises(ValueError, match=field):
            roofline(CONFIG, SLOW_MEMORY, **{field: bad})

    narrow = ModelConfig(**{**CONFIG.__dict__, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2})  # fmt: skip
    fixed, share = 5e-3, 0.6

    def timed(config: ModelConfig) -> tuple[float, float, int]:
        blocks = config.num_hidden_layers
        ceiling = roofline(config, slow_compute, context=0, prompt=64)
        r = roofline(config, slow_compute, context=0, prompt=64,
                     prefill_overhead_s=fixed * blocks, prefill_share=share)  # fmt: skip
        return 64 / ceiling.prefill_tokens_per_s, 64 / r.prefill_tokens_per_s, blocks

    assert fixed_cost_and_share(timed(narrow), timed(CONFIG)) == pytest.approx(
        (fixed, share), rel=1e-9
    )


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
    sizes = [mib for mib, _ in here.cache_bandwidths]
    assert sizes == sorted(sizes) and all(gbs > 0 for _, gbs in here.cache_bandwidths)
    widths = [w for w, _ in here.int4_rates]
    assert widths == sorted(widths) and all(rate > 0.01 for _, rate in here.int4_rates)
    assert all(not d.int4_rates and not d.cache_bandwidths for d in DEVICES.values())


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
