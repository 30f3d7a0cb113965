"""Continuous batching: every request gets exactly the tokens it would get alone, however the
requests overlap, whatever rows move in the shared cache; a cancelled request frees its row."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

import slmlab
from slmlab.infer import BatchRequest, ContinuousBatcher, KVCache
from slmlab.models import DecoderLM, ModelConfig


def tiny(context: int = 96, hidden: int = 32) -> DecoderLM:
    """4 heads of 8 channels; `hidden` 64 gives heads of 16, which the compiled step's
    attention adds up 16 lanes at a time (with AVX-512), the other 8 one at a time."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=60,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    return DecoderLM(config, init_std=0.2).eval()


def random_requests(n: int, seed: int = 0) -> list[BatchRequest]:
    rng = random.Random(seed)
    return [
        BatchRequest(
            [rng.randrange(60) for _ in range(rng.randint(1, 30))],
            rng.randint(1, 25),
            temperature=rng.choice([0.0, 0.0, 1.0]),
            top_k=rng.choice([None, 10]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]),
            seed=i,
        )
        for i in range(n)
    ]


def alone(model: DecoderLM, r: BatchRequest) -> list[int]:
    out = slmlab.generate(
        model,
        [list(r.prompt)],
        r.max_new_tokens,
        temperature=r.temperature,
        top_k=r.top_k,
        repetition_penalty=r.repetition_penalty,
        seed=r.seed,
        stop_tokens=r.stop_tokens,
    )[0]
    return out[len(r.prompt) :]


def assert_rows_hold_what_they_would_alone(model: DecoderLM, batcher: ContinuousBatcher) -> None:
    """Each running row's cached keys and values, and only those positions unmasked, are the
    ones its tokens get decoded alone: the prompt in one call, then one token at a time."""
    cache = batcher.cache
    for slot, row in enumerate(batcher.rows):
        if row is None:
            continue
        r = row.request
        fed = [*r.prompt, *r.tokens[:-1]]
        own = KVCache(model.config, 1, len(fed))
        with torch.no_grad():
            model(torch.tensor([list(r.prompt)]), cache=own)
            for token in r.tokens[:-1]:
                model(torch.tensor([[token]]), cache=own)
        span = slice(row.start, cache.length)
        assert cache.length - row.start == len(fed)
        assert cache.key_mask[slot, span].all() and not cache.key_mask[slot, : row.start].any()
        for shared, alone_ in zip(cache.keys + cache.values, own.keys + own.values, strict=True):
            assert torch.equal(shared[slot, :, span], alone_[0])


@pytest.mark.parametrize(
    ("max_batch", "max_len", "hidden"), [(4, 64, 32), (3, 56, 32), (8, 60, 32), (4, 64, 64)]
)
def test_each_request_gets_its_own_tokens(
    max_batch: int, max_len: int, hidden: int, monkeypatch
) -> None:
    """20 requests of mixed lengths and settings, greedy and sampled, through a cache small
    enough that rows move forward (a long prompt) and back (the cache full) many times."""
    model = tiny(hidden=hidden)
    batcher = ContinuousBatcher(model, max_batch=max_batch, max_len=max_len)
    moves = []
    move = batcher._move
    monkeypatch.setattr(batcher, "_move", lambda shift: (moves.append(shift), move(shift)))
    requests = [batcher.submit(r) for r in random_requests(20)]
    while not batcher.idle:
        batcher.step()
        if batcher.steps % 7 == 0:
            assert_rows_hold_what_they_would_alone(model, batcher)
    assert any(s > 0 for s in moves) and any(s < 0 for s in moves)
    for r in requests:
        assert r.tokens == alone(model, r), r
        assert r.finish_reason == "length"
    # Batching did share steps: fewer decode steps than tokens.
    assert batcher.steps < sum(r.max_new_tokens for r in requests) * 0.6


@pytest.mark.parametrize("fused", [True, False])
def test_newcomers_prompts_ride_the_running_rows_step(fused: bool, monkeypatch) -> None:
    """Where the compiled step takes them, a newcomer's whole prompt goes in the decode step
    beside the running rows' one token each (chunked prefill): no call of its own. Without
    the kernels each prompt is computed first, alone. Either way each request's tokens are its
    own, and every step makes a token for every running row."""
    from slmlab import kernels
    from slmlab.infer import batching

    model = tiny()
    prefilled, ragged = [], []
    prefill = ContinuousBatcher._prefill
    monkeypatch.setattr(
        ContinuousBatcher,
        "_prefill",
        lambda self, slots: (prefilled.extend(slots), prefill(self, slots)),
    )
    step = batching.fused_decode_step
    monkeypatch.setattr(
        batching,
        "fused_decode_step",
        lambda *a, **k: (ragged.append(k["row_tokens"]), step(*a, **k))[1],
    )
    batcher = ContinuousBatcher(model, max_batch=4, max_len=64)
    requests = [batcher.submit(r) for r in random_requests(12, seed=2)]
    with contextlib.ExitStack() as stack:
        if not fused:
            stack.enter_context(kernels.disabled())
        batcher.run()
    for r in requests:
        assert r.tokens == alone(model, r), r
    if fused:
        assert not prefilled
        mixed = [counts for counts in ragged if 1 in counts and max(counts) > 1]
        assert mixed, "some newcomer rode beside a running row"
        assert sum(t for counts in ragged for t in counts if t > 1) <= sum(
            len(r.prompt) for r in requests
        )
    else:
        assert prefilled and not ragged


def test_stop_tokens_strings_and_streaming() -> None:
    model = tiny()
    free = alone(model, BatchRequest([5, 6, 7], 20))
    stop = free[4]
    seen: list[int | None] = []
    letters = type(
        "Letters", (), {"decode": lambda self, ids: "".join(chr(97 + i % 26) for i in ids)}
    )()
    batcher = ContinuousBatcher(model, tokenizer=letters)
    by_token = batcher.submit(BatchRequest([5, 6, 7], 20, stop_tokens=[stop]))
    text = letters.decode(free)
    by_string = batcher.submit(
        BatchRequest([5, 6, 7], 20, stop_strings=[text[6:8]], on_token=lambda r, t: seen.append(t))
    )
    batcher.run()
    assert by_token.tokens == free[: free.index(stop) + 1] and by_token.finish_reason == "stop"
    assert letters.decode(by_string.tokens) == text[: text.index(text[6:8]) + 2]
    assert seen == [*by_string.tokens, None]


def test_a_cancelled_request_frees_its_row_for_the_next() -> None:
    model = tiny()
    batcher = ContinuousBatcher(model, max_batch=1)
    first = batcher.submit(BatchRequest([1, 2, 3], 50))
    second = batcher.submit(BatchRequest([4, 5], 5))
    batcher.step()
    batcher.step()
    assert batcher.running == 1 and len(batcher.waiting) == 1
    batcher.cancel(first)
    assert first.finish_reason == "cancelled" and batcher.running == 0
    batcher.run()
    assert second.tokens == alone(model, second)


def test_requests_that_cannot_run_are_refused() -> None:
    batcher = ContinuousBatcher(tiny(context=32))
    with pytest.raises(ValueError, match=r"plus max_new_tokens \(10\) exceeds the context \(32"):
        batcher.submit(BatchRequest(list(range(25)), 10))
    with pytest.raises(ValueError, match="the prompt is empty"):
        batcher.submit(BatchRequest([], 10))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        batcher.submit(BatchRequest([1], 0))
    with pytest.raises(ValueError, match=r"outside 0\.\.59"):
        batcher.submit(BatchRequest([99], 3))
    with pytest.raises(ValueError, match="stop strings need"):
        batcher.submit(BatchRequest([1], 3, stop_strings=["x"]))
    with pytest.raises(ValueError, match="temperature must be"):
        batcher.submit(BatchRequest([1], 3, temperature=-1))
    assert batcher.idle


def test_a_hybrid_model_batches_with_its_states() -> None:
    """Mamba-2 layers keep a state per row instead of keys: it is placed with the prompt, moves
    with its row and stays when the rows move in the cache; each request's tokens are its own."""
    config = tiny().config.replace(
        model_type="bamba",
        layer_types=["linear_attention", "full_attention"],
        mamba_n_heads=4,
        mamba_d_state=8,
        mamba_chunk_size=8,
    )
    torch.manual_seed(0)
    model = DecoderLM(config, init_std=0.2).eval()
    batcher = ContinuousBatcher(model, max_batch=3, max_len=56)
    requests = [batcher.submit(r) for r in random_requests(10, seed=1)]
    batcher.run()
    for r in requests:
        assert r.tokens == alone(model, r), r
