"""Autoregressive generation: greedy or sampled, batched, with a preallocated KV cache."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..env import memory_bytes
from ..models.budget import kv_cache_bytes_per_token
from ..models.decoder import DecoderLM, KVCache
from .kv_cache import Int8KVCache, SinkKVCache

__all__ = ["draw", "generate", "sample_next", "token_probs"]


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None
) -> None:
    """Refuse settings that would sample something else than asked, before any work: checked
    even at temperature 0, where they are unused, because a mistyped value is still a mistake."""
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN fails every comparison
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive (or None: no cut), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None: no cut), got {top_p}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (or None: no cut), got {min_p}")


def adjust_logits(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    repetition_penalty: float = 1.0,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`logits` (B, vocab) after the controls that look at the text, in transformers' order:
    the repetition penalty of CTRL (Keskar et al., 2019: every token already in a row's `ids`
    has a positive logit divided by the penalty and a negative one multiplied by it), then
    `logit_bias` (vocab,) added, as OpenAI's API adds its ``logit_bias``."""
    if repetition_penalty != 1.0:
        seen = logits.gather(1, ids)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, ids, seen)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def bias_vector(logit_bias: Mapping[int, float], vocab_size: int) -> torch.Tensor:
    """OpenAI's ``logit_bias`` ({token id: bias in [-100, 100]}) as a (vocab,) tensor."""
    bias = torch.zeros(vocab_size)
    for token, value in logit_bias.items():
        if not 0 <= int(token) < vocab_size:
            raise ValueError(
                f"logit_bias names token {token}, outside the vocabulary (0..{vocab_size - 1})"
            )
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise ValueError(f"logit_bias for token {token} must be in [-100, 100], got {value}")
        bias[int(token)] = value
    return bias


def token_probs(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """The distribution (…, vocab) that `sample_next` draws from, for each row of `logits`: the
    softmax at `temperature` after the top-k, top-p and min-p cuts, or at temperature 0 all the
    mass on the argmax. Speculative decoding compares two models' distributions through it.

    top-k keeps the k most likely tokens; top-p (nucleus) keeps the smallest set of most likely
    tokens whose probabilities sum to at least p; min-p keeps the tokens at least min_p times
    as likely as the most likely one (Nguyen et al., 2024). They filter in that order before
    the draw, as in transformers.
    """
    check_sampling(temperature, top_k, top_p, min_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if min_p is not None:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of `logits` (B, vocab): argmax at temperature 0, else a draw
    from `token_probs`."""
    if temperature == 0:
        check_sampling(temperature, top_k, top_p, min_p)
        return logits.argmax(dim=-1)
    probs = token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return draw(probs, generator)


def draw(
    probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator | None] | None = None
) -> torch.Tensor:
    """One token from each row of `probs` (B, vocab), as ``torch.multinomial(probs, 1)`` draws
    it: the exponential race, argmax of p / E with E ~ Exp(1) drawn for every token (a token
    wins with probability p, as in the Gumbel-max trick). `generator` is one generator for all
    rows, or one per row: rows of different requests, each with its own seed, are then drawn
    in one batch, and each row gets the token its generator would draw for it alone."""
    race = torch.empty_like(probs)
    if generator is None or isinstance(generator, torch.Generator):
        race.exponential_(1, generator=generator)
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        for row, own in zip(race, generator, strict=True):
            row.exponential_(1, generator=own)
    return (probs / race).argmax(dim=-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def _constrain(
    logits: torch.Tensor,
    ids: torch.Tensor,
    allowed: Callable[[int, torch.Tensor], Sequence[int]],
) -> torch.Tensor:
    """`logits` with every token that `allowed` does not list for its row set to -inf."""
    mask = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        tokens = allowed(row, ids[row])
        if len(tokens) == 0:
            raise ValueError(
                f"prefix_allowed_tokens_fn allowed no token for row {row}: the constraint cannot "
                "be met; return at least one token id (every id to leave the row free)"
            )
        mask[row, torch.as_tensor(tokens, dtype=torch.long, device=logits.device)] = 0
    return logits + mask


def _check_fits(config, batch: int, length: int, cached: int, device: torch.device) -> None:
    """Refuse, before allocating, a generation that would not fit in memory: the ids and mask
    of `length` tokens a row, and a cache of `cached` positions. Asked for 10^11 tokens, torch
    would otherwise try to allocate terabytes, or swap for hours."""
    needed = batch * (length * 16 + cached * kv_cache_bytes_per_token(config, "fp32"))
    have = memory_bytes(device)
    if needed > have:
        raise ValueError(
            f"{batch} × {length} tokens need {needed / 2**30:,.1f} GiB, more than the "
            f"{have / 2**30:,.1f} GiB this {device.type} has; ask for fewer new tokens"
        )


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    attention_mask: torch.Tensor | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    kv_cache_dtype: torch.dtype | None = None,
    attention_window: int | None = None,
    attention_sinks: int = 4,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; return the ids, prompt included.

    `input_ids` is a (B, T) tensor, left-padded with `attention_mask` marking real tokens (the
    layout of transformers' ``generate``), or a list of prompts of any lengths, which are padded
    here. A tensor comes back as a (B, T + new) tensor in which finished rows continue with
    `pad_token_id`; lists come back as lists, each cut after its stop token.

    `stop_tokens` defaults to the config's ``eos_token_id``; pass ``()`` to never stop early.
    `stop_strings` end a row once its new text (decoded by `tokenizer`) contains one of them;
    the row keeps the token that completed it, as transformers does (an API cuts the text).
    Sampling (temperature > 0) draws from a generator seeded with `seed`, so the same call gives
    the same tokens. `min_p`, `repetition_penalty` and `logit_bias` are the controls of
    `token_probs` and `adjust_logits`, applied as transformers applies them. `kv_cache_dtype` ``torch.int8`` keeps the cache in int8 (chapter 08's
    `slmlab.infer.Int8KVCache`); by default it has the model's dtype. `attention_window` W keeps
    the cache at `attention_sinks` + W positions (`slmlab.infer.SinkKVCache`: the first tokens
    and the W latest), so that generation can go on past the model's context.

    `prefix_allowed_tokens_fn(row, ids)` is transformers' constraint: given a row's index and
    its ids so far (its padded prompt included), it returns the tokens that row may produce
    next; `slmlab.infer.TokenHealer` uses it to regrow a prompt's last word.

    `on_tokens(tokens)` is called after every step with its (B,) new tokens (a finished row's
    is `pad_token_id`): how a chat streams its reply.
    """
    config = model.config
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, min_p)
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be > 0 (1: none), got {repetition_penalty}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer that decodes the ids: pass tokenizer=")
    if any(not s for s in stop_strings):
        raise ValueError("stop_strings must not contain an empty string")
    bias = None if not logit_bias else bias_vector(logit_bias, config.vocab_size)
    if stop_tokens is None:
        stop_tokens = config.eos_token_id
    stops = (
        []
        if stop_tokens is None
        else [stop_tokens]
        if isinstance(stop_tokens, int)
        else list(stop_tokens)
    )
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (
            config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
        )
    )
    as_lists = not isinstance(input_ids, torch.Tensor)
    if as_lists:
        prompts = (
            [list(input_ids)]
            if input_ids and isinstance(input_ids[0], int)
            else [list(p) for p in input_ids]
        )  # type: ignore[index, arg-type]
        if any(not p for p in prompts):
            raise ValueError("a prompt is empty: generation continues at least one token")
        ids, attention_mask = _left_pad(prompts, pad)
    else:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]  # type: ignore[union-attr]
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty: generation continues at least one token")
    device = next(model.parameters()).device
    ids = ids.to(device)
    B, T = ids.shape
    mask = attention_mask.to(device).long() if attention_mask is not None else torch.ones_like(ids)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)

    total = T + max_new_tokens
    cached = total if attention_window is None else min(total, attention_sinks + attention_window)
    _check_fits(config, B, total, cached if use_cache else 0, device)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = ids
    full_mask = torch.ones(B, T + max_new_tokens, dtype=torch.long, device=device)
    full_mask[:, :T] = mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    cache = None
    if attention_window is not None:
        if not use_cache or kv_cache_dtype is not None:
            raise ValueError("attention_window needs the cache in the model's dtype")
        capacity = attention_sinks + attention_window
        if capacity < T:
            raise ValueError(
                f"the prompt ({T} tokens) does not fit the cache ({attention_sinks} sinks + a "
                f"window of {attention_window}): shorten it or widen the window"
            )
        dtype = next(model.parameters()).dtype
        cache = SinkKVCache(
            config, B, attention_window, sinks=attention_sinks, dtype=dtype, device=device
        )
    elif use_cache:
        dtype = next(model.parameters()).dtype
        if kv_cache_dtype is torch.int8:
            cache = Int8KVCache(config, B, T + max_new_tokens, dtype=dtype, device=device)
        elif kv_cache_dtype in (None, dtype):
            cache = KVCache(config, B, T + max_new_tokens, dtype=dtype, device=device)
        else:
            raise ValueError(
                f"kv_cache_dtype {kv_cache_dtype} is not supported: use None (the model's "
                f"dtype, {dtype}) or torch.int8"
            )

    step_ids, step_mask = ids, mask
    length = T
    ends: dict[int, int] = {}  # a row's end where a stop string ended it
    for _ in range(max_new_tokens):
        if cache is None:  # recompute the whole sequence: the reference the cache must match
            step_ids, step_mask = out[:, :length], full_mask[:, :length]
        logits = model(step_ids, step_mask, cache, last_only=True)[:, -1]
        if repetition_penalty != 1.0 or bias is not None:
            logits = adjust_logits(
                logits,
                out[:, :length],
                repetition_penalty=repetition_penalty,
                logit_bias=None if bias is None else bias.to(logits),
            )
        if prefix_allowed_tokens_fn is not None:
            logits = _constrain(logits, out[:, :length], prefix_allowed_tokens_fn)
        token = sample_next(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generator=generator,
        )
        token = torch.where(done, torch.full_like(token, pad), token)
        out[:, length] = token
        length += 1
        if on_tokens is not None:
            on_tokens(token)
        if len(stops):
            done |= torch.isin(token, stop_ids)
        for row in range(B) if stop_strings else ():
            if not done[row] and _ends_in_stop_string(out[row, T:length], tokenizer, stop_strings):
                done[row] = True
                ends[row] = length
        if (len(stops) or stop_strings) and bool(done.all()):
            break
        step_ids, step_mask = out[:, length - 1 : length], full_mask[:, length - 1 : length]
    out = out[:, :length]

    if not as_lists:
        return out
    result = []
    for row, prompt in enumerate(prompts):
        new = out[row, T : ends.get(row, length)].tolist()
        for i, tok in enumerate(new):
            if tok in stops:
                new = new[: i + 1]
                break
        result.append(prompt + new)
    return result


def _ends_in_stop_string(new: torch.Tensor, tokenizer: Any, stop_strings: Sequence[str]) -> bool:
    """Whether the text of a row's `new` tokens contains a stop string. Checked after every
    token until it does, so the token that makes it true is the one that completed it."""
    text = tokenizer.decode(new.tolist())
    return any(s in text for s in stop_strings)
