"""Generation past the context: the sink cache equals full attention while its window covers
everything, and after evictions it equals a direct implementation of StreamingLLM that keeps
keys unrotated and rotates them at their positions in the cache at every step."""

from __future__ import annotations

import math

import pytest
import torch

import slmlab
from slmlab.eval import streaming_token_bits, token_bits
from slmlab.infer import SinkKVCache
from slmlab.models import DecoderLM, ModelConfig
from slmlab.models.rope import apply_rope

from .hf_reference import VARIANTS, perturb_norms_and_biases


def small(context: int = 64) -> DecoderLM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
    )
    model = DecoderLM(config, init_std=0.2).eval()
    return perturb_norms_and_biases(model)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_while_the_window_covers_everything_it_is_full_attention(name: str) -> None:
    torch.manual_seed(0)
    model = DecoderLM(VARIANTS[name]).eval()
    prompts = [[3, 4, 5, 6], [7, 8]]
    expected = slmlab.generate(model, prompts, 20, stop_tokens=())
    assert slmlab.generate(model, prompts, 20, stop_tokens=(), attention_window=30) == expected
    ids = expected[0]
    torch.testing.assert_close(
        streaming_token_bits(model, ids, window=len(ids)), token_bits(model, ids)
    )


def streaming_reference(model: DecoderLM, ids: list[int], sinks: int, window: int):
    """StreamingLLM as its paper writes it, token by token: per layer, the unrotated keys and
    the values of the first `sinks` tokens and the `window` latest; every step rotates each
    key at its index in that list and the query at the last index. Returns the logits."""
    config = model.config
    H, K, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    keys: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    values: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    logits = []
    with torch.no_grad():
        for token in ids:
            x = model.model.embed_tokens(torch.tensor([[token]]))
            for i, block in enumerate(model.model.layers):
                attn = block.self_attn
                h = block.input_layernorm(x)
                q = attn.q_proj(h).view(H, D)
                keys[i].append(attn.k_proj(h).view(K, D))
                values[i].append(attn.v_proj(h).view(K, D))
                if len(keys[i]) > sinks + window:
                    del keys[i][sinks], values[i][sinks]
                n = len(keys[i])
                cos, sin = model.model.rotary_emb(torch.arange(n)[None], torch.float32)
                cos, sin = cos[0, 0], sin[0, 0]  # (n, D)
                k = apply_rope(torch.stack(keys[i], 1), cos, sin)  # (K, n, D)
                qr = apply_rope(q[:, None], cos[-1:], sin[-1:])  # (H, 1, D)
                k = k.repeat_interleave(H // K, 0)
                v = torch.stack(values[i], 1).repeat_interleave(H // K, 0)
                weights = (qr @ k.transpose(1, 2) / math.sqrt(D)).softmax(-1)
                out = (weights @ v).reshape(1, 1, H * D)
                x = x + attn.o_proj(out)
                x = x + block.mlp(block.post_attention_layernorm(x))
            logits.append(model.lm_head(model.model.norm(x))[0, 0])
    return torch.stack(logits)


@pytest.mark.parametrize(("sinks", "window"), [(4, 12), (0, 9), (2, 5)])
def test_after_evictions_it_is_streaming_llm(sinks: int, window: int) -> None:
    """Three times the cache's size in tokens, one at a time, through the fused step and the
    blocks alike: the logits of every step equal the direct implementation's."""
    model = small()
    ids = torch.randint(0, 50, (3 * (sinks + window),), generator=torch.Generator().manual_seed(1))
    expected = streaming_reference(model, ids.tolist(), sinks, window)
    for fused in (True, False):
        cache = SinkKVCache(model.config, 1, window, sinks=sinks)
        with torch.no_grad(), slmlab.kernels.disabled() if not fused else torch.no_grad():
            got = torch.stack(
                [model(ids[i : i + 1][None], cache=cache)[0, -1] for i in range(len(ids))]
            )
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert cache.evicted == len(ids) - sinks - window


def test_evicting_several_at_a_time_keeps_the_cache_within_its_size() -> None:
    """llama.cpp's way: drop `evict` tokens when full. The cache never exceeds its size, and
    right after each eviction it holds the sinks and the latest tokens: its logits equal a
    fresh cache fed exactly those tokens."""
    model = small()
    sinks, window, evict = 2, 8, 4
    ids = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(2))
    cache = SinkKVCache(model.config, 1, window, sinks=sinks, evict=evict)
    with torch.no_grad():
        for i in range(len(ids)):
            model(ids[i : i + 1][None], cache=cache)
            assert cache.length <= sinks + window
    assert cache.evicted % evict == 0 and cache.evicted + cache.length == len(ids)


def test_long_generation_and_bad_settings() -> None:
    model = small(context=32)
    out = slmlab.generate(model, [1, 2, 3], 100, stop_tokens=(), attention_window=20)[0]
    assert len(out) == 103  # three times the context
    with pytest.raises(ValueError, match="exceeds the model's context"):
        SinkKVCache(model.config, 1, 30, sinks=4)
    with pytest.raises(ValueError, match="does not fit the cache"):
        slmlab.generate(model, list(range(30)), 4, attention_window=20)
    with pytest.raises(ValueError, match="needs the cache in the model's dtype"):
        slmlab.generate(model, [1], 4, attention_window=20, kv_cache_dtype=torch.int8)
    with pytest.raises(ValueError, match="position 32 is beyond"):
        slmlab.generate(model, [1, 2, 3], 40, stop_tokens=())  # without a window


def test_a_sliding_model_needs_a_cache_no_longer_than_its_window() -> None:
    """Mistral's layers all look back `sliding_window` tokens: a cache of that many positions
    and no sinks (positions shifted as tokens leave) decodes the tokens of the full cache, with
    memory that stops growing at the window."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, model_type="mistral", sliding_window=8,
        max_position_embeddings=256,
    )  # fmt: skip
    model = DecoderLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # sharp distributions: a wrong key shows in the tokens
    full = slmlab.generate(model, [[1, 2, 3, 4, 5]], 60)
    bounded = slmlab.generate(model, [[1, 2, 3, 4, 5]], 60, attention_window=8, attention_sinks=0)
    assert full == bounded
    assert len(set(full[0][20:])) > 5  # it kept writing new tokens past the window
    shorter = slmlab.generate(model, [[1, 2, 3, 4, 5]], 60, attention_window=6, attention_sinks=0)
    assert shorter != full  # the check can tell: two keys short of the window changes the text


def test_latent_attention_evicts_by_turning_back_its_shared_key() -> None:
    """Latent attention caches latents (no rotation in them) and one rotated key: after
    evictions, a one-layer model (whose cached entries depend on their token alone) gives the
    logits of the model run afresh on the tokens the cache kept, at their cache positions."""
    torch.manual_seed(0)
    model = perturb_norms_and_biases(
        DecoderLM(VARIANTS["deepseek-latent"].replace(num_hidden_layers=1)).eval()
    )
    sinks, window = 2, 6
    ids = torch.randint(0, 100, (20,), generator=torch.Generator().manual_seed(2))
    cache = SinkKVCache(model.config, 1, window, sinks=sinks)
    with torch.no_grad():
        for t in range(len(ids)):
            got = model(ids[t : t + 1][None], cache=cache)[0, -1]
            seen = ids[: t + 1]
            kept = seen if t < sinks + window else torch.cat((seen[:sinks], seen[-window:]))
            torch.testing.assert_close(got, model(kept[None])[0, -1], rtol=1e-4, atol=1e-4)
    assert cache.evicted == len(ids) - sinks - window
