"""slmlab.quant: error bounds per format, codebooks and codes against bitsandbytes, packing round
trips, `quantize_` against a model holding the dequantized weights, and bad configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slmlab.models import DecoderLM, ModelConfig
from slmlab.quant import (
    QuantConfig,
    QuantLinear,
    codebook,
    dequantize,
    pack_int4,
    quantize,
    quantize_,
    unpack_int4,
)


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.05
    w[3, 17] = 0.9  # an outlier, as real layers have
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 256, None])
def test_round_to_nearest_is_off_by_at_most_half_a_step(weight, bits, symmetric, group_size):
    q = quantize(weight, "int", bits, group_size=group_size, symmetric=symmetric)
    error = (dequantize(q) - weight).abs()
    group = q.group_size
    step = q.scales.repeat_interleave(group, dim=1)  # each weight's own scale
    assert (error <= step / 2 + 1e-6).all()
    levels = 2**bits - (1 if symmetric else 0)
    assert int(q.codes.max()) - int(q.codes.min()) < levels
    if not symmetric:  # zero is exactly representable (padding and ReLU zeros stay zero)
        zero = weight.clone()
        zero[:, :group] = 0
        assert (
            dequantize(quantize(zero, "int", bits, group_size=group_size, symmetric=False))[
                :, :group
            ]
            == 0
        ).all()


def test_finer_granularity_gives_smaller_error(weight) -> None:
    def mse(**kwargs) -> float:
        return float((dequantize(quantize(weight, "int", 4, **kwargs)) - weight).pow(2).mean())

    per_tensor = mse(group_size=None, per_tensor=True)
    per_channel = mse(group_size=None)
    per_group = mse(group_size=32)
    assert per_group < per_channel < per_tensor


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_codebooks_equal_bitsandbytes(fmt) -> None:
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    theirs = bnb.get_4bit_type(fmt, device="cpu").sort().values
    assert torch.allclose(codebook(fmt), theirs, atol=1e-6)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_codes_equal_bitsandbytes(weight, fmt) -> None:
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=fmt)
    theirs = bnb.dequantize_4bit(packed, state, quant_type=fmt)
    ours = dequantize(quantize(weight, fmt, 4, group_size=64))
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(("fmt", "mantissa"), [("fp8_e4m3", 3), ("fp8_e5m2", 2)])
def test_fp8_rounds_to_the_nearest_float8(weight, fmt, mantissa) -> None:
    q = quantize(weight, fmt, 8, group_size=None)
    assert q.codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    ours = dequantize(q)
    scaled = weight / q.scales
    big = scaled.abs() > 2**-4  # away from the subnormal range
    relative = ((ours - weight) / weight)[big].abs()
    assert relative.max() <= 2 ** -(mantissa + 1) + 1e-6


def test_int4_packing_round_trips_and_halves_the_bytes() -> None:
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # the documented nibble order
    with pytest.raises(ValueError, match="last dimension divisible by 2"):
        pack_int4(codes[:, :3])
    with pytest.raises(ValueError, match=r"0\.\.15"):
        pack_int4(codes + 16)


def test_two_bit_packing_holds_four_codes_a_byte() -> None:
    from slmlab.layers.formats import pack_codes, unpack_codes

    codes = torch.randint(0, 4, (5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, 2)
    assert packed.shape == (5, 16)
    assert torch.equal(unpack_codes(packed, 2), codes)
    assert packed[1, 0] == codes[1, 0] | codes[1, 1] << 2 | codes[1, 2] << 4 | codes[1, 3] << 6


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_packing_is_one_bit_stream_of_any_width(bits: int) -> None:
    from slmlab.layers.formats import pack_codes, unpack_codes

    codes = torch.randint(0, 2**bits, (3, 40), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 40 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)
    # The layout, independently: code i is bits i·b .. i·b + b − 1 of the row, read as one
    # little-endian integer.
    row = int.from_bytes(bytes(packed[1].tolist()), "little")
    assert [(row >> (i * bits)) & (2**bits - 1) for i in range(40)] == codes[1].tolist()


def test_three_bit_layers_store_three_eighths_of_a_byte_per_weight(weight) -> None:
    from slmlab.quant import QuantLinear

    q = quantize(weight, "int", 3, group_size=32)
    layer = QuantLinear(q, None)
    assert layer.codes.shape == (weight.shape[0], weight.shape[1] * 3 // 8)
    assert torch.equal(layer.dequantized_weight(), dequantize(q))
    rows = torch.tensor([5, 0, 5])  # the rows an embedding lookup reads, unpacked alone
    assert torch.equal(dequantize(layer.quantized(rows)), dequantize(q)[rows])


def test_ternary_weights_are_minus_one_zero_one_times_the_mean_magnitude(weight) -> None:
    q = quantize(weight, "ternary", 2, group_size=None)
    values = dequantize(q) / q.scales  # per row: exactly −1, 0 or +1
    assert set(values.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(q.scales[:, 0], weight.abs().mean(1))
    # a weight below half the mean magnitude rounds to 0, above it to ±1
    small = weight.abs() < 0.5 * weight.abs().mean(1, keepdim=True)
    assert (values[small] == 0).all() and (values[~small].abs() == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 100}, "group_size 100 does not divide the layer's input width 256"),
        ({"bits": 9}, "int formats take 2 to 8 bits, got 9"),
        ({"fmt": "nf4", "bits": 3}, "nf4 is a 4-bit format"),
        ({"fmt": "int5"}, "unknown format 'int5'"),
    ],
)
def test_bad_configs_say_what_to_change(weight, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(weight, **{"fmt": "int", "bits": 4, **kwargs})


def small_model() -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return DecoderLM(config).eval()


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(fmt="int", bits=4, group_size=32),
        QuantConfig(fmt="int", bits=8, group_size=None, symmetric=False),
        QuantConfig(fmt="nf4", bits=4, group_size=64),
    ],
)
def test_quantize_swaps_linears_for_their_dequantized_weights(config) -> None:
    model = small_model()
    reference = small_model()  # the same weights, replaced by hand with their round trips
    for module in reference.modules():
        if isinstance(module, nn.Linear) and module is not reference.lm_head:
            q = quantize(module.weight, config.fmt, config.bits, group_size=config.group_size,
                         symmetric=config.symmetric)  # fmt: skip
            module.weight.data = dequantize(q)
    quantize_(model, config)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 2 * 7 and isinstance(model.lm_head, nn.Linear)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids), reference(ids), atol=1e-5)
    if config.bits == 4:  # packed: half a byte per weight
        layer = quantized[0]
        assert layer.codes.numel() == layer.in_features * layer.out_features // 2


def test_quantized_model_generates_with_the_kernels_bypassed_safely() -> None:
    from slmlab.infer import generate

    model = small_model()
    quantize_(model, QuantConfig(fmt="int", bits=8, group_size=None))
    full = small_model()
    tokens = generate(model, [[1, 2, 3]], 6, stop_tokens=())[0]
    # 8-bit per-channel weights barely move a small model's greedy choices.
    assert tokens == generate(full, [[1, 2, 3]], 6, stop_tokens=())[0]


def test_int8_kv_cache_stores_a_third_of_the_bytes_and_rounds_per_vector() -> None:
    from slmlab.infer import KVCache
    from slmlab.quant import Int8KVCache

    config = small_model().config  # head_dim 16: 16 bytes of codes + 4 of scale per vector
    full, int8 = KVCache(config, 2, 20), Int8KVCache(config, 2, 20)
    assert int8.nbytes() / full.nbytes() == pytest.approx((16 + 4) / (16 * 4))
    k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16) * 10
    keys, values = int8.update(0, k, v)
    for exact, stored in ((k, keys), (v, values)):
        half_step = exact.abs().amax(-1, keepdim=True) / 127 / 2
        assert ((stored - exact).abs() <= half_step + 1e-6).all()


def test_decoding_with_an_int8_kv_cache_stays_close_to_the_full_cache() -> None:
    from slmlab.infer import KVCache, generate
    from slmlab.quant import Int8KVCache

    model = small_model()
    ids = torch.randint(0, 300, (2, 14), generator=torch.Generator().manual_seed(3))
    logits = {}
    with torch.no_grad():
        for name, cache in (
            ("full", KVCache(model.config, 2, 14)),
            ("int8", Int8KVCache(model.config, 2, 14)),
        ):
            steps = [model(ids[:, :6], cache=cache)]  # the prompt, then one token at a time
            steps += [model(ids[:, t : t + 1], cache=cache) for t in range(6, 14)]
            logits[name] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["full"], model(ids))  # the fp32 cache is exact
    error = (logits["int8"] - logits["full"]).abs().max()
    assert 0 < error < 0.02 * logits["full"].std()
    tokens = generate(model, [[5, 17, 42]], 4, stop_tokens=(), kv_cache_dtype=torch.int8)
    assert len(tokens[0]) == 7
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        generate(model, [[5, 17]], 2, kv_cache_dtype=torch.float16)


def test_absmax_rounding_against_its_definition() -> None:
    from slmlab.layers.formats import absmax_round, absmax_scale

    x = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [300.0, 1.0, -1.0, 0.25]])
    codes, scale = absmax_round(x, 8)
    assert torch.equal(scale[:2, 0], torch.tensor([2.0 / 127, 1e-12 / 127]))
    assert torch.equal(codes[0], torch.tensor([32.0, -127.0, 64.0, 0.0]))  # 0.5 * 127 / 2 = 31.75
    assert torch.equal(codes[1], torch.zeros(4))  # an all-zero row divides safely
    # LLM.int8's outliers are left out of the scale (and clamped in the codes).
    codes, scale = absmax_round(x[2:], 8, ignore=x[2:].abs() >= 6)
    assert scale.item() == pytest.approx(1 / 127) and codes.tolist() == [
        [127.0, 127.0, -127.0, 32.0]
    ]
    assert torch.equal(absmax_scale(x, 4), x.abs().amax(-1).clamp(min=1e-12) / 7)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_a_packed_4bit_layer_dequantizes_as_its_codes_do(weight, fmt) -> None:
    """The layer's byte-at-a-time lookup against the codes unpacked, then dequantized."""
    from slmlab.layers.quantized import QuantLinear

    q = quantize(weight, fmt, 4, group_size=32)
    layer = QuantLinear(q, None)
    assert layer.codes.shape[-1] * 2 == weight.shape[1]  # stored packed
    torch.testing.assert_close(layer.dequantized_weight(), dequantize(q), rtol=0, atol=0)
