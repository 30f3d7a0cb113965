"""Compiled kernels against their pure-PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slmlab
from slmlab import kernels
from slmlab.infer import KVCache
from slmlab.models import DecoderLM, ModelConfig

from .hf_reference import VARIANTS, perturb_norms_and_biases

pytestmark = pytest.mark.skipif(
    kernels.cpu_kernels() is None,
    reason="CPU kernels could not be built here (no compiler or not x86-64)",
)


@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 768, 768), (1, 300, 97), (3, 64, 1536), (4, 8192, 64)]
)
def test_gemv_matches_linear(rows: int, n: int, k: int) -> None:
    x, w = torch.randn(rows, k), torch.randn(n, k)
    torch.testing.assert_close(kernels.gemv(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    ys = kernels.gemv_many(x, [w, w[: n // 2].contiguous()])
    torch.testing.assert_close(ys[1], x @ w[: n // 2].T, rtol=1e-5, atol=1e-4)


def test_gemv_falls_back_outside_its_domain() -> None:
    x, w = torch.randn(64, 32), torch.randn(16, 32)  # too many rows: PyTorch's matmul wins
    torch.testing.assert_close(kernels.gemv(x, w), x @ w.T)
    xb = x[:1].bfloat16()
    torch.testing.assert_close(kernels.gemv(xb, w.bfloat16()), xb @ w.bfloat16().T)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_step_matches_the_blocks(name: str) -> None:
    """Logits and cache after each decode step equal the PyTorch blocks', padded batch included."""
    config = VARIANTS[name]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    ids = torch.randint(0, config.vocab_size, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    results = []
    for use_kernels in (True, False):
        cache = KVCache(config, 3, 20)
        steps = []
        with torch.no_grad():
            ctx = kernels.disabled() if not use_kernels else torch.no_grad()
            with ctx:
                model(ids[:, :8], mask[:, :8], cache)
                for t in range(8, 12):
                    steps.append(model(ids[:, t : t + 1], mask[:, t : t + 1], cache))
        results.append((torch.cat(steps, 1), cache.keys[-1][:, :, :12], cache.values[0][:, :, :12]))
    for fast, reference in zip(*results, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def left_padded(
    config: ModelConfig, tokens: int, padding: int
) -> tuple[DecoderLM, torch.Tensor, torch.Tensor]:
    """A seeded model of `config` with perturbed norms and biases, and two rows of `tokens`
    random ids, the second left-padded by `padding`."""
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    ids = torch.randint(0, config.vocab_size, (2, tokens))
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[1, :padding] = 0
    return model, ids, mask


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_step_takes_a_few_tokens_per_row(name: str) -> None:
    """Chunks of 1 to 4 tokens continuing the cache (how a speculative draft is checked) give
    the blocks' logits and cache, padded batch included; and, where the compiled step runs, a
    token's logits are those of the same token decoded alone, to the bit."""
    config = VARIANTS[name]
    model, ids, mask = left_padded(config, 20, padding=3)

    def run(chunks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(config, 2, 24)
        out = []
        with torch.no_grad():
            model(ids[:, :5], mask[:, :5], cache)
            t = 5
            for n in chunks:
                out.append(model(ids[:, t : t + n], mask[:, t : t + n], cache))
                t += n
        return torch.cat(out, 1), cache.keys[-1][:, :, :t]

    chunked = run([1, 3, 4, 2, 4])
    with kernels.disabled():
        reference = run([1, 3, 4, 2, 4])
    for fast, slow in zip(chunked, reference, strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    if config.num_experts or config.sliding_window or config.mamba_n_heads or config.latent:
        return  # the blocks run these (no experts, window, Mamba-2 or latents in the step)
    one_by_one = run([1] * 14)
    assert torch.equal(chunked[0], one_by_one[0]) and torch.equal(chunked[1], one_by_one[1])


def test_a_small_models_prompt_goes_through_the_step_in_one_call(monkeypatch) -> None:
    """A 30-token prompt of a model with small blocks is one call of the compiled step (the
    blocks' forward would cost more in dispatch than in arithmetic), with the blocks' logits
    and cache; a left-padded row's numbers are those of its prompt alone, to the bit; past
    `FUSED_PREFILL_WEIGHTS` the blocks run it."""
    import slmlab.models.decoder as decoder

    config = VARIANTS["llama-gqa-untied"]
    model, ids, mask = left_padded(config, 30, padding=7)
    calls = []
    step = decoder.decode_step
    monkeypatch.setattr(decoder, "decode_step", lambda *a, **k: (calls.append(1), step(*a, **k))[1])

    def prefill(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(config, ids.shape[0], 32)
        with torch.no_grad():
            return model(ids, mask, cache), cache

    fused, cache = prefill(ids, mask)
    assert len(calls) == 1
    with kernels.disabled():
        blocks, reference = prefill(ids, mask)
    torch.testing.assert_close(fused[mask.bool()], blocks[mask.bool()], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.keys[0][:, :, :30], reference.keys[0][:, :, :30])
    alone, own = prefill(ids[1:, 7:], mask[1:, 7:])
    assert torch.equal(fused[1, 7:], alone[0])
    assert torch.equal(cache.values[-1][1, :, 7:30], own.values[-1][0, :, :23])
    monkeypatch.setattr(decoder, "FUSED_PREFILL_WEIGHTS", 0)
    calls.clear()
    prefill(ids, mask)
    assert not calls


@pytest.mark.parametrize("floats_per_thread", [1, 1 << 14])
def test_many_rows_in_one_step_are_each_what_they_are_alone(floats_per_thread: int) -> None:
    """24 left-padded rows decoded together, their norms, rotations and activations split
    between threads (every row its own share at 1 float a thread; none split at the kernels'
    default of 16K for this small model): each row's logits and cache are those of its tokens
    decoded alone, to the bit."""
    from slmlab.models.decoder import takes_fused_step

    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    rows, width = 24, 12
    ids = torch.randint(0, config.vocab_size, (rows, width + 1))
    mask = torch.ones(rows, width + 1, dtype=torch.long)
    for r in range(rows):
        mask[r, : r % width] = 0

    def decode(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache(config, ids.shape[0], ids.shape[1])
        with torch.no_grad():
            model(ids[:, :-1], mask[:, :-1], cache)
            return model(ids[:, -1:], mask[:, -1:], cache)[:, -1], cache

    with torch.no_grad():
        assert takes_fused_step(model, rows, 1, KVCache(config, rows, width + 1))
    extension = kernels.cpu_kernels()
    extension.set_min_floats_per_thread(floats_per_thread)
    try:
        together, cache = decode(ids, mask)
    finally:
        extension.set_min_floats_per_thread(1 << 14)  # the kernels' own default
    for r in range(rows):
        pad = r % width
        alone, own = decode(ids[r : r + 1, pad:], mask[r : r + 1, pad:])
        assert torch.equal(together[r], alone[0]), r
        for shared, mine in zip(cache.keys + cache.values, own.keys + own.values, strict=True):
            assert torch.equal(shared[r, :, pad:], mine[0]), r


def test_rows_of_different_lengths_in_one_step_are_each_what_they_are_alone() -> None:
    """Chunked prefill: running rows with one new token each beside newcomers' whole prompts,
    every row's last token at the cache's end. Each row's logits and cache are those of its
    tokens decoded alone (what was cached, then its new tokens in one call), to the bit."""
    from slmlab.models.decoder import fused_decode_step, takes_ragged_step

    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    length = 10  # positions already cached; the step adds one
    cached = [3, 0, 10, 7, 0, 1]  # each row's tokens in the cache before the step
    new = [1, 6, 1, 4, 11, 3]  # and its new ones: 0 cached are newcomers
    rows = len(cached)
    seqs = [torch.randint(0, config.vocab_size, (c + t,)) for c, t in zip(cached, new, strict=True)]
    cache = KVCache(config, rows, length + 1)
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r, (seq, c, t) in enumerate(zip(seqs, cached, new, strict=True)):
        end = length + 1 - t  # a row's cached tokens end where its new ones begin
        ids[r, end - c : end], mask[r, end - c : end] = seq[:c], 1
    with torch.no_grad():
        model(ids, mask, cache)
        for r, t in enumerate(new):
            cache.key_mask[r, length + 1 - t :] = True  # the new tokens' places
        assert takes_ragged_step(model, new, cache)
        flat = torch.cat([seq[c:] for seq, c in zip(seqs, cached, strict=True)])
        together = fused_decode_step(model, flat, cache, logits=True, row_tokens=new)
        last = fused_decode_step(model, flat, cache, logits=True, last_only=True, row_tokens=new)
    assert together is not None and last is not None
    assert together.shape == (sum(new), config.vocab_size) and last.shape == (
        rows,
        1,
        config.vocab_size,
    )
    at = 0
    for r, (seq, c, t) in enumerate(zip(seqs, cached, new, strict=True)):
        own = KVCache(config, 1, c + t)
        with torch.no_grad():
            if c:
                model(seq[None, :c], cache=own)
            alone = model(seq[None, c:], cache=own)[0]
        assert torch.equal(together[at : at + t], alone), r
        assert torch.equal(last[r, 0], alone[-1]), r
        for shared, mine in zip(cache.keys + cache.values, own.keys + own.values, strict=True):
            assert torch.equal(shared[r, :, length + 1 - c - t :], mine[0]), r
        at += t
    with torch.no_grad(), pytest.raises(RuntimeError, match="row 1 has 12 new tokens"):
        fused_decode_step(model, flat[:18], cache, logits=True, row_tokens=[1, 12, 1, 1, 1, 2])


def test_the_fused_step_sees_layers_swapped_and_hooks_added_after_it_ran() -> None:
    """The step keeps each model's gathered operands between calls; a projection replaced, a
    weight reassigned, a block removed or a hook registered afterwards is taken into account."""
    from slmlab.models import replace_module

    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 8))

    def decode() -> torch.Tensor:
        cache = KVCache(config, 1, 8)
        with torch.no_grad():
            model(ids[:, :7], cache=cache)
            return model(ids[:, 7:], cache=cache)

    def blocks() -> torch.Tensor:
        with kernels.disabled():
            return decode()

    decode()
    replace_module(model, "model.layers.0.mlp.up_proj", torch.nn.Linear(64, 160, bias=False))
    torch.testing.assert_close(decode(), blocks(), rtol=1e-4, atol=1e-4)
    model.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(
        torch.randn_like(model.model.layers[1].self_attn.q_proj.weight)
    )
    torch.testing.assert_close(decode(), blocks(), rtol=1e-4, atol=1e-4)
    del model.model.layers[0]
    torch.testing.assert_close(decode(), blocks(), rtol=1e-4, atol=1e-4)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: seen.append(1))
    decode()
    assert seen == [1, 1]  # the prompt's call and the decoded token's


def test_the_fused_step_runs_the_head_unless_it_or_the_final_norm_is_watched() -> None:
    """Asked for logits, the step runs the final norm and the head in its call, to the logits
    of the model run block by block; a hook on either, or a norm weight or head replaced, is
    seen, and the blocks stay fused."""
    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    ids = torch.randint(0, config.vocab_size, (1, 9))

    def decode(**options) -> torch.Tensor:
        cache = KVCache(config, 1, 9)
        with torch.no_grad():
            model(ids[:, :6], cache=cache)
            return model(ids[:, 6:], cache=cache, **options)

    def blocks(**options) -> torch.Tensor:
        with kernels.disabled():
            return decode(**options)

    for options in ({}, {"last_only": True}):
        fused = decode(**options)
        assert fused.shape == (1, 1 if options else 3, config.vocab_size)
        torch.testing.assert_close(fused, blocks(**options), rtol=1e-4, atol=1e-4)
    model.model.norm.weight = torch.nn.Parameter(torch.rand(config.hidden_size) + 0.5)
    model.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    torch.testing.assert_close(decode(), blocks(), rtol=1e-4, atol=1e-4)
    for module in (model.model.norm, model.lm_head):
        seen = []
        handle = module.register_forward_hook(lambda *args, seen=seen: seen.append(1))
        torch.testing.assert_close(decode(), blocks(), rtol=1e-4, atol=1e-4)
        assert seen == [1, 1, 1, 1]  # prompt and tokens, fused and block by block
        handle.remove()


def test_greedy_steps_in_one_call_are_the_models_own_choices() -> None:
    """`fused_decode_tokens` chooses, after each token of a 3-token feed and then after each
    choice fed back, the tokens the model's forward and ``torch.argmax`` choose one call at a
    time, with the first of equal logits (every head row comes twice, so every maximum is a
    tie); the cache holds every token but the last chosen, as the call-at-a-time loop leaves
    it."""
    from slmlab.models.decoder import fused_decode_tokens

    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    with torch.no_grad():
        model.lm_head.weight[1::2] = model.lm_head.weight[::2]
    ids = torch.randint(0, config.vocab_size, (1, 8))
    steps = 6

    def prefilled() -> KVCache:
        cache = KVCache(config, 1, 16)
        model(ids[:, :5], cache=cache)
        return cache

    with torch.no_grad():
        fused_cache = prefilled()
        out = fused_decode_tokens(model, ids[:, 5:], fused_cache, steps)
        assert out is not None and out[1] is None
        chosen = out[0]
        loop_cache, feed, expected = prefilled(), ids[:, 5:], []
        with kernels.disabled():
            for _ in range(steps):
                expected += model(feed, cache=loop_cache)[0].argmax(dim=-1).tolist()
                feed = torch.tensor([[expected[-1]]])
    assert chosen.tolist() == [expected]
    assert all(t % 2 == 0 for t in expected)  # the first of each tied pair
    assert fused_cache.length == loop_cache.length == 5 + 3 + steps - 1
    length = fused_cache.length
    torch.testing.assert_close(
        fused_cache.keys[-1][:, :, :length],
        loop_cache.keys[-1][:, :, :length],
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_compiled_drafts_are_the_drafters_own_one_step_at_a_time(temperature: float) -> None:
    """A drafter's steps in one compiled call choose what its step-by-step loop chooses: at
    temperature 0 the argmaxes; sampled, the same draws from the same generator, from the same
    distributions (the softmax at the temperature) that come back for the acceptance rule.
    With a confidence floor both end after the first choice whose probability is below it:
    drafts of several lengths, and the same cache length."""
    from slmlab.infer.speculative import ModelDrafter

    config = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # confident on some tokens, unsure on others
    lengths = set()
    for seed in range(12):
        ids = torch.randint(
            0, config.vocab_size, (6,), generator=torch.Generator().manual_seed(seed)
        )
        drafts = []
        for fused in (True, False):
            drafter = ModelDrafter(
                model,
                32,
                min_confidence=0.5,
                temperature=temperature,
                generator=torch.Generator().manual_seed(seed),
            )
            with torch.no_grad(), kernels.disabled() if not fused else torch.no_grad():
                tokens, dists = drafter.propose(ids.tolist(), 7)
            drafts.append((tokens, drafter.cache.length, dists))
        (tokens, length, dists), (loop_tokens, loop_length, loop_dists) = drafts
        assert (tokens, length) == (loop_tokens, loop_length)
        if temperature == 0:
            assert dists is None and loop_dists is None
        else:
            assert dists is not None and dists.shape == (len(tokens), config.vocab_size)
            torch.testing.assert_close(dists, loop_dists, rtol=1e-5, atol=1e-6)
        lengths.add(len(tokens))
    assert len(lengths) > 1 and max(lengths) <= 7


def test_generation_same_tokens_with_and_without_kernels() -> None:
    model = DecoderLM(VARIANTS["qwen2-bias"]).eval()
    prompts = [[3, 4, 5, 6], [7]]
    fast = slmlab.generate(model, prompts, 24, stop_tokens=())
    with kernels.disabled():
        assert slmlab.generate(model, prompts, 24, stop_tokens=()) == fast


def _int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int4 kernel rounds it: int8 per block of 32, scale absmax / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, blocks / scale, torch.zeros_like(blocks)).round()
    return (codes * scale).reshape(x.shape)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("vector", [True, False])
def test_int4_linear_matches_dequantize_then_matmul(
    symmetric, group_size, vector, monkeypatch
) -> None:
    from slmlab.quant import dequantize, pack_int4, quantize

    monkeypatch.setattr(kernels, "INT4_MAX_ROWS_INT8", 8)  # rows in chunks of 4: 4 + 2 below

    torch.manual_seed(0)
    weight = torch.randn(200, 256) * 0.05
    weight[7, 100] = 1.5  # an outlier in one group
    q = quantize(weight, "int", 4, group_size=group_size, symmetric=symmetric)
    packed, reference = pack_int4(q.codes), dequantize(q)
    for rows in (1, 3, 6):  # decoding: x rounded to int8 per block of 32, integer dot products
        x = torch.randn(rows, 256)
        x[0, :32] = 0.0  # an all-zero block has scale 0
        y = kernels.int4_linear(x, packed, q.scales, q.zeros, q.group_size, vector=vector)
        torch.testing.assert_close(y, _int8_blocks(x) @ reference.T, rtol=1e-5, atol=1e-5)
        # ... which is within int8 rounding of the exact product
        exact = x @ reference.T
        assert (y - exact).abs().max() < 0.02 * exact.abs().max()
    x = torch.randn(2, 9, 256)  # prefill: dequantized tiles and PyTorch's GEMM, exact
    y = kernels.int4_linear(x, packed, q.scales, q.zeros, q.group_size, vector=vector)
    torch.testing.assert_close(y, x @ reference.T, rtol=1e-5, atol=1e-5)


def test_prefill_products_reuse_their_scratch_but_return_their_own_result() -> None:
    """Many rows of x are multiplied by the weight unpacked a tile at a time into scratch memory
    the calling thread keeps from call to call (fresh pages at every layer cost a prefill a
    third of its time): each result is the caller's own, unchanged by the next call, and a
    weight of several tiles (4,200 rows of 512: three tiles of up to 2,048) gives the product."""
    from slmlab.layers import pack_2to4
    from slmlab.quant import dequantize, pack_int4, quantize

    torch.manual_seed(0)
    big = quantize(torch.randn(4200, 512) * 0.05, "int", 4, group_size=32, symmetric=False)
    small = quantize(torch.randn(40, 512) * 0.05, "int", 4, group_size=32, symmetric=False)
    x = torch.randn(6, 512)  # more rows than the int8 path takes
    first = kernels.int4_linear(x, pack_int4(big.codes), big.scales, big.zeros, 32)
    kept = first.clone()
    second = kernels.int4_linear(2 * x, pack_int4(small.codes), small.scales, small.zeros, 32)
    sparse = _sparse24(40, 512)
    third = kernels.sparse24_linear(x, *pack_2to4(sparse))
    assert torch.equal(first, kept)
    # One output: y^T's transpose is contiguous as it stands, and must still be copied.
    row = quantize(torch.randn(1, 512) * 0.05, "int", 4, group_size=32, symmetric=False)
    alone = kernels.int4_linear(x, pack_int4(row.codes), row.scales, row.zeros, 32)
    kept = alone.clone()
    kernels.int4_linear(-x, pack_int4(row.codes), row.scales, row.zeros, 32)
    assert torch.equal(alone, kept)
    torch.testing.assert_close(first, x @ dequantize(big).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, 2 * x @ dequantize(small).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third, x @ sparse.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [1, 2, 3, 5, 6, 7, 18])
@pytest.mark.parametrize("group_blocks", [1, None])
def test_int4_linear_takes_any_number_of_blocks(blocks, group_blocks) -> None:
    """The vector loop takes blocks of 32 inputs four at a time, into four running sums, and the
    last one to three alone: every remainder, and groups of one block or the whole row, give
    the product of the rounded x and the dequantized weight (18 blocks: SmolLM2's 576 inputs).
    A single row of x takes the weight's rows a few at a time (43 rows: some left over) and a
    row batched with others one at a time: each of its outputs is the same to the bit."""
    from slmlab.quant import dequantize, pack_int4, quantize

    torch.manual_seed(blocks)
    width = 32 * blocks
    group = 32 if group_blocks == 1 else None
    q = quantize(torch.randn(43, width) * 0.05, "int", 4, group_size=group, symmetric=False)
    reference = dequantize(q)
    for rows in (1, 4):
        x = torch.randn(rows, width)
        y = kernels.int4_linear(x, pack_int4(q.codes), q.scales, q.zeros, q.group_size)
        torch.testing.assert_close(y, _int8_blocks(x) @ reference.T, rtol=1e-5, atol=1e-5)
    for b in range(4):
        alone = kernels.int4_linear(
            x[b : b + 1], pack_int4(q.codes), q.scales, q.zeros, q.group_size
        )
        assert torch.equal(alone[0], y[b])


def test_int4_linear_declines_what_it_cannot_do() -> None:
    from slmlab.quant import pack_int4, quantize

    q = quantize(torch.randn(8, 96), "int", 4, group_size=48)  # a group that is not 32k
    assert kernels.int4_linear(torch.randn(1, 96), pack_int4(q.codes), q.scales, None, 48) is None
    q = quantize(torch.randn(8, 64), "int", 4, group_size=32)
    x = torch.randn(1, 64, dtype=torch.float64)
    assert kernels.int4_linear(x, pack_int4(q.codes), q.scales, None, 32) is None
    with pytest.raises(RuntimeError, match="do not match input width"):
        kernels.int4_linear(torch.randn(1, 128), pack_int4(q.codes), q.scales, None, 32)


# The int4 products of a few layers, written to a safetensors file: run here and in a process
# whose kernels were built for another CPU, to compare the two builds.
_INT4_PRODUCTS = """
import sys
import torch
from safetensors.torch import save_file
from slmlab import kernels
from slmlab.quant import pack_int4, quantize

assert kernels.cpu_kernels() is not None, "no kernels built"
out = {}
# (inputs, group): blocks of 32 in pairs and four at a time, with none, one or two left over;
# a group of one block, two, or three (a pair of blocks across two groups); rows of 2048 inputs
# and more, which a single row of x takes one row of W at a time.
for width, group in ((512, 64), (576, 32), (544, 32), (576, 96), (2080, 32), (2112, 64)):
    for symmetric in (True, False):
        torch.manual_seed(0)
        q = quantize(torch.randn(98, width) * 0.05, "int", 4, group_size=group, symmetric=symmetric)
        for rows in (1, 3, 4):
            x = torch.randn(rows, width)
            out[f"{width}-{group}-{symmetric}-{rows}"] = kernels.int4_linear(
                x, pack_int4(q.codes), q.scales, q.zeros, group
            )
from slmlab.layers import pack_2to4
from slmlab.prune import nm_mask
w = torch.randn(96, 520)  # 520 inputs: the vector loops' tails run too
w = w * nm_mask(w.abs(), 2, 4)
for rows in (1, 3, 4):
    x = torch.randn(rows, 520)
    out[f"sparse24-{rows}"] = kernels.sparse24_linear(x, *pack_2to4(w))
    out[f"sparse24-{rows}-reference"] = (x.double() @ w.double().T).float()
w = torch.randn(95, 520)  # an odd number of rows: AVX-512 takes two at a time, then one
for rows in range(1, 9):
    out[f"dense-{rows}"] = kernels.gemv(torch.randn(rows, 520), w)
save_file(out, sys.argv[1])
"""


def _int4_products(path: Path, arch: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SLMLAB_CPU_ARCH"}
    if arch:
        env["SLMLAB_CPU_ARCH"] = arch
    return subprocess.run(
        [sys.executable, "-c", _INT4_PRODUCTS, str(path)], env=env, capture_output=True, text=True
    )


def test_kernels_built_for_an_avx2_cpu_compute_the_same(tmp_path) -> None:
    """SLMLAB_CPU_ARCH=x86-64-v3 builds the code that AVX2 CPUs without AVX-512 run (maddubs
    + madd where this machine may use VNNI; one block of 32 inputs at a time where AVX-512
    takes four, the last few under a mask): the same integers and sums, so the same int4
    products to the bit, zero points included (a single row of x takes four rows of W at a
    time with AVX-512, two with AVX2; 98 rows leave some over); the 2:4 products (AVX2's two permutations
    where AVX-512 has one) equal float64's; the fp32 products (AVX-512's two rows of W at a
    time) are AVX2's to the bit."""
    native = _int4_products(tmp_path / "native.safetensors", None)
    assert native.returncode == 0, native.stderr
    avx2 = _int4_products(tmp_path / "avx2.safetensors", "x86-64-v3")
    assert avx2.returncode == 0, avx2.stderr
    expected, got = (
        load_file(tmp_path / "native.safetensors"),
        load_file(tmp_path / "avx2.safetensors"),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        if name.startswith("sparse24"):  # fp32 sums in another order: each against float64's
            if not name.endswith("reference"):
                for products in (expected, got):
                    reference = products[f"{name}-reference"]
                    torch.testing.assert_close(products[name], reference, rtol=1e-5, atol=1e-4)
            continue
        if name.startswith("dense"):
            assert torch.equal(got[name], expected[name]), name
            continue
        assert torch.equal(got[name], expected[name]), name


def test_a_build_target_the_compiler_does_not_know_is_named(tmp_path) -> None:
    result = _int4_products(tmp_path / "none.safetensors", "no-such-cpu")
    assert result.returncode != 0  # no kernels, and the warning says which setting to fix
    assert "SLMLAB_CPU_ARCH='no-such-cpu'" in result.stderr


def _decode_fused_and_layer_by_layer(model: DecoderLM, rows: int, monkeypatch):
    """Four decoding steps of `rows` rows after a 6-token prefix, through the fused step and
    again with the step declining (the layers one by one): whether each step ran fused, and
    each run's logits and last cache."""
    import slmlab.models.decoder as decoder

    config = model.config
    fused_step = decoder.fused_decode_step
    ran: list[bool] = []

    def watched(model, input_ids, *args, **kwargs):
        out = fused_step(model, input_ids, *args, **kwargs)
        if input_ids.shape[1] == 1:  # the decoding steps, not the prefix
            if kwargs.get("logits"):  # a step first asks for its logits...
                ran.append(out is not None)
            else:  # ... and, where the head did not fuse, for the blocks alone
                ran[-1] = out is not None
        return out

    def run(ids: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(decoder, "fused_decode_step", step)
        cache = KVCache(config, ids.shape[0], 16)
        with torch.no_grad():
            model(ids[:, :6], cache=cache)
            steps = [model(ids[:, t : t + 1], cache=cache) for t in range(6, ids.shape[1])]
        return torch.cat(steps, 1), cache.keys[-1][:, :, : ids.shape[1]]

    ids = torch.randint(0, config.vocab_size, (rows, 10))
    fast = run(ids, watched)
    reference = run(ids, lambda *args, **kwargs: None)
    monkeypatch.setattr(decoder, "fused_decode_step", fused_step)  # for the next call
    return ran, fast, reference


@pytest.mark.parametrize("symmetric", [True, False])
def test_decode_step_with_int4_layers_matches_the_layers(symmetric, monkeypatch) -> None:
    """A 4-bit model (q, k, v biased, so the biases are added too) decodes in the fused step
    to the logits and cache of its layers run one by one through the int4 kernel, for every
    row count the kernel computes in integers; more rows fall back to the layers."""
    from slmlab.quant import QuantConfig, quantize_

    config = VARIANTS["qwen2-bias"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    quantize_(model, QuantConfig(bits=4, group_size=32, symmetric=symmetric))
    for rows in (1, kernels.INT4_MAX_ROWS_INT8):
        ran, fast, reference = _decode_fused_and_layer_by_layer(model, rows, monkeypatch)
        assert ran == [True] * 4
        for a, b in zip(fast, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ran, _, _ = _decode_fused_and_layer_by_layer(model, kernels.INT4_MAX_ROWS_INT8 + 1, monkeypatch)
    assert ran == [False] * 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_step_reads_a_4bit_embedding_as_the_table_does(symmetric, monkeypatch) -> None:
    """A table of 4-bit rows (the tied embedding and head of a Q4_0-like model) is looked up
    inside the compiled step, each row dequantized there: the logits and cache equal, bit for
    bit, those of the step given the rows that the table's own forward dequantizes."""
    import slmlab.models.decoder as decoder
    from slmlab.layers import QuantEmbedding
    from slmlab.models.swap import replace_module
    from slmlab.quant import QuantConfig, quantize, quantize_

    config = VARIANTS["llama-mha-tied-theta"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    quantize_(model, QuantConfig(bits=4, group_size=32, embedding_bits=4))
    if not symmetric:  # zero points too, which quantize_ does not give an embedding
        table = model.model.embed_tokens.linear.dequantized_weight(torch.float32)
        q = quantize(table + 0.01, "int", 4, group_size=32, symmetric=False)
        replace_module(model, "model.embed_tokens", QuantEmbedding(q))
    assert kernels.embedding_operands(model.model.embed_tokens) is not None
    with torch.no_grad():  # the step runs, from the ids to the logits
        one = torch.tensor([[3]])
        assert decoder.fused_decode_step(model, one, KVCache(config, 1, 4), logits=True) is not None

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(config, 2, 16)
        ids = torch.randint(
            0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            model(ids[:, :6], cache=cache)
            steps = [model(ids[:, t : t + 1], cache=cache) for t in range(6, 9)]
        return torch.cat(steps, 1), cache.keys[-1][:, :, :9]

    looked_up_in_the_step = run()
    monkeypatch.setattr(decoder, "embedding_operands", lambda table: None)
    looked_up_by_the_table = run()
    for a, b in zip(looked_up_in_the_step, looked_up_by_the_table, strict=True):
        assert torch.equal(a, b)


def _sparse24(n: int, k: int, seed: int = 0) -> torch.Tensor:
    from slmlab.prune import nm_mask

    torch.manual_seed(seed)
    w = torch.randn(n, k)
    return w * nm_mask(w.abs(), 2, 4)


@pytest.mark.parametrize(("n", "k"), [(7, 40), (96, 576), (64, 1544)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("vector", [True, False])
def test_sparse24_linear_matches_the_dense_product(n: int, k: int, rows: int, vector: bool) -> None:
    """The packed 2:4 product equals x times the masked dense weight, for the decoding rows
    (packed, vector and portable loops, tails of every length) and for prefill (unpacked
    tiles); widths that are not multiples of 32 or 64 exercise the loops' tails."""
    from slmlab.layers import pack_2to4

    w = _sparse24(n, k)
    x = torch.randn(rows, k)
    y = kernels.sparse24_linear(x, *pack_2to4(w), vector=vector)
    assert y is not None
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_sparse24_linear_declines_what_it_cannot_do() -> None:
    from slmlab.layers import pack_2to4

    values, positions = pack_2to4(_sparse24(8, 64))
    assert kernels.sparse24_linear(torch.randn(1, 64).bfloat16(), values, positions) is None
    x = torch.randn(1, 64, requires_grad=True)
    assert kernels.sparse24_linear(x, values, positions) is None  # autograd: the layer unpacks
    with pytest.raises(RuntimeError, match="do not match input width"):
        kernels.sparse24_linear(torch.randn(1, 72), values, positions)


def test_decode_step_with_2to4_layers_matches_the_layers(monkeypatch) -> None:
    """A model whose projections are packed 2:4 (q, k, v biased) decodes in the fused step to
    the logits and cache of its layers run one by one, at 1 and 4 rows."""
    from slmlab.layers import Sparse24Linear
    from slmlab.prune import PruneConfig, pack_2to4_, prune_

    config = VARIANTS["qwen2-bias"]
    torch.manual_seed(0)
    model = DecoderLM(config).eval()
    perturb_norms_and_biases(model)
    prune_(model, PruneConfig("magnitude", pattern="2:4"))
    pack_2to4_(model)
    assert sum(isinstance(m, Sparse24Linear) for m in model.modules()) == 7 * len(
        model.model.layers
    )
    for rows in (1, 4):
        ran, fast, reference = _decode_fused_and_layer_by_layer(model, rows, monkeypatch)
        assert ran == [True] * 4
        for a, b in zip(fast, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
