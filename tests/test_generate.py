"""Generation: the KV cache changes nothing, and greedy tokens equal transformers' generate."""

from __future__ import annotations

import pytest
import torch

import slmlab
from slmlab.infer import KVCache, sample_next
from slmlab.infer.generate import draw
from slmlab.models import DecoderLM, ModelConfig

from .hf_reference import VARIANTS, save_hf

transformers = pytest.importorskip("transformers")
PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12], [60, 61, 62, 63]]


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias"])
def test_cache_gives_the_tokens_of_recomputation(name: str) -> None:
    model = DecoderLM(VARIANTS[name]).eval()
    with_cache = slmlab.generate(model, PROMPTS, 20, stop_tokens=())
    without = slmlab.generate(model, PROMPTS, 20, stop_tokens=(), use_cache=False)
    assert with_cache == without
    assert [len(r) for r in with_cache] == [len(p) + 20 for p in PROMPTS]


def test_cached_logits_equal_full_forward() -> None:
    config = VARIANTS["llama-mqa-llama3-rope"]
    model = DecoderLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 30))
    cache = KVCache(config, 2, 30)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :10], cache=cache), model(ids[:, 10:25], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(25, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mha-tied-theta", "qwen2-bias"])
def test_greedy_equals_transformers_generate_batched(name: str, tmp_path) -> None:
    config = VARIANTS[name]
    theirs = save_hf(config, tmp_path)
    ours = slmlab.load(tmp_path)
    pad = 0
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    expected = theirs.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    got = slmlab.generate(ours, ids, 16, attention_mask=mask, stop_tokens=(), pad_token_id=pad)
    assert torch.equal(got, expected)
    # and one prompt at a time gives the same continuations as the batch
    for row, prompt in enumerate(PROMPTS):
        single = slmlab.generate(ours, prompt, 16, stop_tokens=())[0]
        assert single == prompt + expected[row, width:].tolist()


def test_allowed_tokens_constrain_like_transformers(tmp_path) -> None:
    theirs = save_hf(VARIANTS["llama-gqa-untied"], tmp_path)
    ours = slmlab.load(tmp_path)
    vocab = ours.config.vocab_size
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])

    def allowed(row: int, seq: torch.Tensor) -> list[int]:
        step = len(seq) - width  # rows take turns: odd ids, then multiples of 3, then anything
        if step < 4:
            return list(range(1 + row % 2, vocab, 2 + row % 2))
        return list(range(vocab))

    expected = theirs.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
        eos_token_id=None, prefix_allowed_tokens_fn=allowed,
    )  # fmt: skip
    got = slmlab.generate(
        ours, ids, 8, attention_mask=mask, stop_tokens=(), pad_token_id=0,
        prefix_allowed_tokens_fn=allowed,
    )  # fmt: skip
    assert torch.equal(got, expected)
    free = slmlab.generate(ours, ids, 8, attention_mask=mask, stop_tokens=(), pad_token_id=0)
    assert not torch.equal(got, free)
    with pytest.raises(ValueError, match="allowed no token for row 1"):
        slmlab.generate(
            ours, PROMPTS, 2, prefix_allowed_tokens_fn=lambda row, _: [] if row else [1]
        )


def test_stop_tokens_end_each_row() -> None:
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    free = slmlab.generate(model, PROMPTS, 12, stop_tokens=())
    stop = free[0][len(PROMPTS[0]) + 3]  # the 4th token row 0 would produce
    stopped = slmlab.generate(model, PROMPTS, 12, stop_tokens=[stop])
    for prompt, full, cut in zip(PROMPTS, free, stopped, strict=True):
        new = full[len(prompt) :]
        expected = new[: new.index(stop) + 1] if stop in new else new
        assert cut == prompt + expected


def test_sampling_is_seeded_and_filters() -> None:
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    a = slmlab.generate(
        model, PROMPTS, 15, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_tokens=()
    )
    b = slmlab.generate(
        model, PROMPTS, 15, temperature=1.0, top_k=20, top_p=0.9, seed=7, stop_tokens=()
    )
    c = slmlab.generate(
        model, PROMPTS, 15, temperature=1.0, top_k=20, top_p=0.9, seed=8, stop_tokens=()
    )
    assert a == b and a != c


def test_a_draw_is_torch_multinomials_with_one_generator_or_one_per_row() -> None:
    """`draw` makes torch.multinomial's choice from the same generator state, whether one
    generator serves every row or each row has its own (a batch of requests), and leaves each
    generator where multinomial leaves it; its tokens follow the distribution (chi-square)."""
    torch.manual_seed(0)
    probs = (torch.randn(5, 300) * 3).softmax(-1)
    probs[2, 7:] = 0.0  # a row with few tokens left, as top-k leaves it
    probs[2] /= probs[2].sum()
    for seed in range(20):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(
            draw(probs, ours), torch.multinomial(probs, 1, generator=theirs).squeeze(-1)
        )
        assert torch.equal(ours.get_state(), theirs.get_state())
        own = [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
        alone = [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
        expected = [
            int(torch.multinomial(probs[i : i + 1], 1, generator=g)) for i, g in enumerate(alone)
        ]
        assert draw(probs, own).tolist() == expected
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    generator = torch.Generator().manual_seed(1)
    counts = torch.bincount(
        torch.cat([draw(p.expand(1000, 4), generator) for _ in range(10)]), minlength=4
    ).double()
    expected_counts = 10_000 * p[0].double()
    chi2 = float(((counts - expected_counts) ** 2 / expected_counts).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001
    with pytest.raises(ValueError, match="2 generators for 5 rows"):
        draw(probs, own[:2])


def test_sample_next_filters_like_transformers() -> None:
    """top-k and top-p keep exactly the tokens transformers' logits processors keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(5, None), (None, 0.8), (10, 0.5), (None, 0.05)]:
        expected = logits.clone()
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p:
            expected = TopPLogitsWarper(top_p)(None, expected)
        allowed = torch.isfinite(expected)
        draws = torch.stack(
            [
                sample_next(
                    logits,
                    temperature=1.0,
                    top_k=top_k,
                    top_p=top_p,
                    generator=torch.Generator().manual_seed(s),
                )
                for s in range(300)
            ]
        )
        seen = torch.zeros_like(allowed)
        seen.scatter_(1, draws.T, True)
        assert torch.equal(seen, allowed), (top_k, top_p)


def test_min_p_keeps_what_transformers_keeps() -> None:
    """token_probs with min-p (after temperature, top-k and top-p) is the softmax of what
    transformers' warpers leave, in their order."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    for temperature, top_k, min_p in [(1.0, None, 0.1), (0.7, 20, 0.05), (1.3, None, 0.5)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        expected = MinPLogitsWarper(min_p)(None, expected).softmax(-1)
        got = slmlab.infer.token_probs(logits, temperature=temperature, top_k=top_k, min_p=min_p)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_repetition_penalty_and_logit_bias_equal_transformers(tmp_path) -> None:
    """The penalty is transformers' RepetitionPenaltyLogitsProcessor, and greedy generation
    with it, or with a logit bias (transformers' sequence_bias for single tokens), gives
    transformers' tokens."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from slmlab.infer.generate import adjust_logits

    ids = torch.tensor([[3, 3, 7, 1], [0, 9, 9, 9]])
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    expected = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(adjust_logits(logits, ids, repetition_penalty=1.7), expected)

    config = VARIANTS["llama-gqa-untied"]
    theirs = save_hf(config, tmp_path)
    ours = slmlab.load(tmp_path)
    prompt = PROMPTS[0]
    free = slmlab.generate(ours, prompt, 12, stop_tokens=())[0][len(prompt) :]
    banned = free[2]
    for ours_kwargs, theirs_kwargs in [
        ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
        ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
        ({"logit_bias": {banned: -100.0}}, {"sequence_bias": {(banned,): -100.0}}),
    ]:
        expected = theirs.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **theirs_kwargs,
        )[0].tolist()
        got = slmlab.generate(ours, prompt, 12, stop_tokens=(), **ours_kwargs)[0]
        assert got == expected, ours_kwargs
    assert banned not in got[len(prompt) :]


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i % 26)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_end_a_row_at_the_token_that_completes_them() -> None:
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    free = slmlab.generate(model, PROMPTS, 16, stop_tokens=())
    texts = [Letters().decode(row[len(p) :]) for row, p in zip(free, PROMPTS, strict=True)]
    stop = texts[0][5:7]  # two letters row 0 writes; other rows may write them too, or not
    got = slmlab.generate(
        model, PROMPTS, 16, stop_tokens=(), stop_strings=[stop], tokenizer=Letters()
    )
    for row, prompt, text in zip(got, PROMPTS, texts, strict=True):
        end = text.find(stop)
        expected = text if end < 0 else text[: end + len(stop)]
        assert Letters().decode(row[len(prompt) :]) == expected
    tensor = slmlab.generate(
        model,
        torch.tensor([PROMPTS[0]]),
        16,
        stop_tokens=(),
        stop_strings=[stop],
        tokenizer=Letters(),
        pad_token_id=0,
    )
    assert tensor.shape[1] == len(got[0])  # the only row ended there, and so did generation


def test_repeated_ngram_share() -> None:
    from slmlab.eval import repeated_ngram_share

    assert repeated_ngram_share(list("abcabcabc"), n=3) == 4 / 7
    assert repeated_ngram_share([1, 2, 3, 4, 5], n=2) == 0.0
    assert repeated_ngram_share([7] * 10, n=1) == 0.9
    assert repeated_ngram_share([1, 2], n=3) == 0.0  # no n-gram at all


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0 .*, got nan"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p must be in"),
        ({"temperature": 1.0, "top_k": 0}, "top_k must be positive"),
        ({"top_k": 0}, "top_k must be positive"),  # greedy: unused, and still a mistake
        ({"min_p": 1.5}, "min_p must be in"),
    ],
)
def test_bad_sampling_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_next(torch.randn(1, 10), **kwargs)
    model = DecoderLM(
        ModelConfig(
            vocab_size=10,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ValueError, match=message):  # before any work
        slmlab.generate(model, [[1, 2]], 4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"logit_bias": {10_000: 1.0}}, "logit_bias names token 10000, outside the vocabulary"),
        ({"logit_bias": {3: 101.0}}, r"logit_bias for token 3 must be in \[-100, 100\]"),
        ({"stop_strings": ["x"]}, "stop_strings need the tokenizer"),
        ({"stop_strings": [""], "tokenizer": Letters()}, "must not contain an empty string"),
    ],
)
def test_bad_generation_controls(kwargs: dict, message: str) -> None:
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    with pytest.raises(ValueError, match=message):
        slmlab.generate(model, [[1, 2]], 4, **kwargs)


def test_more_new_tokens_than_memory_holds_are_refused_before_allocating() -> None:
    model = DecoderLM(VARIANTS["llama-gqa-untied"]).eval()
    with pytest.raises(ValueError, match=r"1 × 100000000002 tokens need .* GiB, more than the"):
        slmlab.generate(model, [[1, 2]], 10**11)
    # a window bounds the cache, not the ids: 10^13 tokens are still refused
    with pytest.raises(ValueError, match=r"1 × 10000000000002 tokens need"):
        slmlab.generate(model, [[1, 2]], 10**13, attention_window=8, attention_sinks=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_cuda_gives_the_cpu_tokens(monkeypatch) -> None:
    """Greedy decoding on the GPU gives the CPU's tokens, in fp32 (TF32 off) and for a 4-bit
    copy, whose layers run the Triton kernel there and dequantize-then-multiply on the CPU."""
    import copy

    from slmlab import kernels
    from slmlab.quant import QuantConfig, quantize_

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # for this test only
    torch.manual_seed(0)
    model = DecoderLM(VARIANTS["qwen2-bias"]).eval()
    cpu = slmlab.generate(model, PROMPTS, 16, stop_tokens=())
    assert slmlab.generate(copy.deepcopy(model).cuda(), PROMPTS, 16, stop_tokens=()) == cpu
    quantized = quantize_(copy.deepcopy(model), QuantConfig(bits=4, group_size=32))
    with kernels.disabled():
        cpu = slmlab.generate(quantized, PROMPTS, 16, stop_tokens=())
    assert slmlab.generate(quantized.cuda(), PROMPTS, 16, stop_tokens=()) == cpu
