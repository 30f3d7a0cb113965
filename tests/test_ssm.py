"""Mamba-2 layers (`slmlab.models.ssm`): the parallel form against the recurrence written out,
against transformers' own scan, and the hybrid model's cache, padding and packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slmlab
from slmlab.models import DecoderLM, KVCache, ModelConfig
from slmlab.models.config import ConfigError
from slmlab.models.ssm import GatedRMSNorm, causal_conv, ssd_chunked, ssd_step

from .hf_reference import VARIANTS, perturb_norms_and_biases

HYBRID = VARIANTS["bamba-hybrid"]


def scan_inputs(b=2, T=23, h=4, p=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, p, generator=g)
    dt = F.softplus(torch.randn(b, T, h, generator=g))
    A = -torch.rand(h, generator=g) * 2 - 0.1
    B = torch.randn(b, T, h, n, generator=g)
    C = torch.randn(b, T, h, n, generator=g)
    state = torch.randn(b, h, p, n, generator=g)
    return x, dt, A, B, C, state


def recurrence(x, dt, A, B, C, state):
    """The definition, one token and one head at a time, in float64."""
    x, dt, A, B, C, state = (t.double() for t in (x, dt, A, B, C, state))
    b, T, h, p = x.shape
    state = state.clone()
    y = torch.zeros(b, T, h, p, dtype=torch.float64)
    for t in range(T):
        for head in range(h):
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            write = dt[:, t, head, None, None] * x[:, t, head, :, None] * B[:, t, head, None, :]
            state[:, head] = decay * state[:, head] + write
            y[:, t, head] = (state[:, head] @ C[:, t, head, :, None])[..., 0]
    return y, state


@pytest.mark.parametrize("chunk", [1, 4, 7, 23, 64])
def test_the_chunked_form_equals_the_recurrence(chunk: int) -> None:
    x, dt, A, B, C, state = scan_inputs()
    expected, final = recurrence(x, dt, A, B, C, state)
    y, got = ssd_chunked(x, dt, A, B, C, chunk_size=chunk, state=state)
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), final, rtol=1e-4, atol=1e-4)


def test_the_step_is_one_token_of_the_recurrence() -> None:
    x, dt, A, B, C, state = scan_inputs(T=6)
    expected, _ = recurrence(x, dt, A, B, C, state)
    for t in range(6):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        torch.testing.assert_close(y.double(), expected[:, t], rtol=1e-5, atol=1e-5)


def test_the_scan_matches_transformers() -> None:
    bamba = pytest.importorskip("transformers.models.bamba.modeling_bamba")
    x, dt, A, B, C, state = scan_inputs(T=37, h=4, n=6)
    raw_dt = torch.randn_like(dt)
    dt_bias, D = torch.randn(4), torch.randn(4)
    groups = 2  # transformers takes each group's B and C once and repeats them itself
    B, C = B[:, :, ::2], C[:, :, ::2]
    theirs, their_state = bamba.mamba2_chunk_scan(
        x, raw_dt, A, B, C, chunk_size=8, D=D, dt_bias=dt_bias, dt_softplus=True,
        initial_states=state, return_final_states=True,
    )  # fmt: skip
    heads = 4 // groups
    ours, our_state = ssd_chunked(
        x,
        F.softplus(raw_dt + dt_bias),
        A,
        B.repeat_interleave(heads, dim=2),
        C.repeat_interleave(heads, dim=2),
        chunk_size=16,
        state=state,
    )
    torch.testing.assert_close(ours + x * D[:, None], theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_state, their_state, rtol=1e-4, atol=1e-4)


def test_the_gated_norm_matches_transformers() -> None:
    bamba = pytest.importorskip("transformers.models.bamba.modeling_bamba")
    theirs = bamba.BambaRMSNormGated(12, group_size=4, eps=1e-5)
    ours = GatedRMSNorm(12, group_size=4, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.weight.copy_(theirs.weight)
    y, z = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    torch.testing.assert_close(ours(y, z), theirs(y, z))


def test_the_convolution_is_pytorchs_causal_conv1d() -> None:
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 11, 6)
    expected = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_conv(x, conv.weight, conv.bias), expected)
    # In two pieces, the second reading the first's last inputs.
    first = causal_conv(x[:, :5], conv.weight, conv.bias)
    second = causal_conv(x[:, 5:], conv.weight, conv.bias, past=x[:, 2:5])
    torch.testing.assert_close(torch.cat((first, second), 1), expected)


def test_a_reset_cuts_the_scan_and_the_convolution() -> None:
    """Two texts packed into one row give what each gives alone."""
    x, dt, A, B, C, _ = scan_inputs(b=1, T=20)
    resets = torch.zeros(1, 20, dtype=torch.bool)
    resets[0, [0, 8]] = True
    y, _ = ssd_chunked(x, dt, A, B, C, chunk_size=6, resets=resets)
    alone = [ssd_chunked(*(t[:, s] for t in (x, dt)), A, *(t[:, s] for t in (B, C)), chunk_size=6)[0]
             for s in (slice(0, 8), slice(8, 20))]  # fmt: skip
    torch.testing.assert_close(y, torch.cat(alone, 1), rtol=1e-5, atol=1e-5)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5)
    u = torch.randn(1, 20, 5)
    packed = causal_conv(u, conv.weight, conv.bias, resets=resets)
    apart = [causal_conv(u[:, s], conv.weight, conv.bias) for s in (slice(0, 8), slice(8, 20))]
    torch.testing.assert_close(packed, torch.cat(apart, 1))


def hybrid_model(seed: int = 0, config: ModelConfig = HYBRID) -> DecoderLM:
    torch.manual_seed(seed)
    return perturb_norms_and_biases(DecoderLM(config).eval())


def test_packed_examples_do_not_see_each_other() -> None:
    """A row of two examples (`segments`) gives each example's own logits: attention layers and
    Mamba-2 layers both start afresh at the second; the gradients stay finite."""
    model = hybrid_model()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    segments = torch.tensor([[0] * 13 + [1] * 17])
    packed = model(ids, segments=segments)
    with torch.no_grad():
        apart = torch.cat((model(ids[:, :13]), model(ids[:, 13:])), 1)
    torch.testing.assert_close(packed.detach(), apart, rtol=1e-5, atol=1e-5)
    packed.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_left_padding_writes_nothing_to_the_state() -> None:
    model = hybrid_model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, 5:], model(ids), rtol=0, atol=1e-5)
        # the same through a cache, the prompt then one token at a time
        cache = KVCache(HYBRID, 1, 20)
        parts = [model(padded[:, :9], mask[:, :9], cache)]
        parts += [model(padded[:, t : t + 1], mask[:, t : t + 1], cache) for t in range(9, 17)]
        torch.testing.assert_close(torch.cat(parts, 1)[:, 5:], model(ids), rtol=0, atol=1e-5)


def test_the_state_does_not_grow_with_the_context() -> None:
    """A Mamba-2 layer's cache is the same size for 10 tokens or 1000; attention's grows."""
    short, long = KVCache(HYBRID, 1, 10), KVCache(HYBRID, 1, 1000)
    attention_layers = HYBRID.num_hidden_layers - sum(HYBRID.linear_layers)
    per_token = 2 * attention_layers * HYBRID.kv_size * 4
    assert long.nbytes() - short.nbytes() == 990 * per_token
    state = HYBRID.mamba_n_heads * HYBRID.mamba_d_head * HYBRID.mamba_d_state * 4
    assert short.nbytes() > sum(HYBRID.linear_layers) * state  # the states are counted


def test_a_state_is_restored_not_rewound() -> None:
    model = hybrid_model()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = KVCache(HYBRID, 1, 12)
    with torch.no_grad():
        model(ids[:, :8], cache=cache)
        saved = cache.snapshot()
        first = model(ids[:, 8:], cache=cache)
        with pytest.raises(ValueError, match="snapshot"):
            cache.length = 8
        cache.restore(saved)
        torch.testing.assert_close(model(ids[:, 8:], cache=cache), first, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mamba_n_heads": 7}, "mamba_n_heads .7. must divide"),
        ({"mamba_n_groups": 3}, "mamba_n_groups .3. must divide mamba_n_heads"),
        ({"mamba_d_head": 4}, "mamba_d_head × mamba_n_heads"),
        ({"mamba_d_state": 0}, "mamba_d_state must be a positive integer"),
        ({"layer_types": ["full_attention"] * 3}, "at least one 'linear_attention'"),
        ({"partial_rotary_factor": 1.0}, "partial_rotary_factor must be 0.5"),
        ({"sliding_window": 4}, "has no sliding window"),
    ],
)
def test_bad_hybrid_configs_name_the_field(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        HYBRID.replace(**changes)


def test_mamba_layers_need_a_hybrid_architecture() -> None:
    llama = VARIANTS["llama-gqa-untied"]
    with pytest.raises(ConfigError, match="no linear_attention"):
        llama.replace(layer_types=["linear_attention", "full_attention"])
    with pytest.raises(ConfigError, match="mamba_n_heads is for"):
        llama.replace(mamba_n_heads=8)


def test_a_hybrid_checkpoint_round_trips(tmp_path) -> None:
    model = hybrid_model()
    ids = torch.randint(0, 128, (2, 9))
    slmlab.save(model, tmp_path / "ckpt")
    names = set(slmlab.checkpoint.load_state_dict(tmp_path / "ckpt"))
    assert "model.layers.0.feed_forward.up_proj.weight" in names  # Bamba's own names on file
    assert "model.final_layernorm.weight" in names and "model.layers.0.mamba.A_log" in names
    with torch.no_grad():
        torch.testing.assert_close(slmlab.load(tmp_path / "ckpt")(ids), model(ids))


def test_attention_sinks_evict_keys_while_the_state_keeps_reading() -> None:
    """Past a SinkKVCache's window the attention layer drops its oldest keys; the Mamba-2
    layers go on from their states. Within the window it is the plain cache exactly."""
    from slmlab.infer import SinkKVCache

    model = hybrid_model()
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    sinks, plain = SinkKVCache(HYBRID, 1, 20, sinks=2), KVCache(HYBRID, 1, 40)
    with torch.no_grad():
        steps = [(model(ids[:, t : t + 1], cache=sinks), model(ids[:, t : t + 1], cache=plain))
                 for t in range(40)]  # fmt: skip
    for t in range(22):
        torch.testing.assert_close(steps[t][0], steps[t][1], rtol=0, atol=1e-5)
    assert sinks.evicted == 18 and torch.isfinite(steps[-1][0]).all()


def test_the_budget_counts_the_mamba_layers() -> None:
    """Parameters tensor by tensor as the model has them; only attention layers pay per token
    of context; the cache per token counts attention layers alone."""
    from slmlab.models import flops_per_token, kv_cache_bytes_per_token, param_count

    counted = param_count(HYBRID)
    assert counted.total == DecoderLM(HYBRID).num_parameters()
    mamba = sum(p.numel() for n, p in DecoderLM(HYBRID).named_parameters() if ".mamba." in n)
    assert counted.mamba == mamba
    attention_layers = HYBRID.num_hidden_layers - sum(HYBRID.linear_layers)
    extra = flops_per_token(HYBRID, 100) - flops_per_token(HYBRID, 0)
    assert extra == 4 * HYBRID.q_size * 100 * attention_layers
    assert kv_cache_bytes_per_token(HYBRID, "fp32") == 2 * attention_layers * HYBRID.kv_size * 4
