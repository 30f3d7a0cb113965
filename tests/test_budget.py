"""Budgets against the published totals and against the models transformers builds."""

from __future__ import annotations

import pytest
import torch

from slmlab.models import ModelConfig, budget

transformers = pytest.importorskip("transformers")

PUBLISHED = budget.published_models()


def hf_model(config: ModelConfig, device: str = "meta") -> torch.nn.Module:
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    # Eager attention is plain matmuls, which torch's FLOP counter sees (its fused CPU kernel
    # for scaled_dot_product_attention is not counted).
    hf_config._attn_implementation = "eager"
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def test_at_least_six_published_models() -> None:
    assert len(PUBLISHED) >= 6


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_matches_published_total(name: str) -> None:
    model = PUBLISHED[name]
    total = budget.param_count(model.config).total
    assert abs(total / model.published_params - 1) < 0.01, (total, model.published_params)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_count_matches_transformers_tensor_by_tensor(name: str) -> None:
    cfg = PUBLISHED[name].config
    model = hf_model(cfg)
    counts = budget.param_count(cfg)
    by_part = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    for pname, p in model.named_parameters():  # tied parameters are listed once
        if "embed_tokens" in pname:
            by_part["embedding"] += p.numel()
        elif "self_attn" in pname:
            by_part["attention"] += p.numel()
        elif ".mlp." in pname:
            by_part["mlp"] += p.numel()
        elif "norm" in pname:
            by_part["norms"] += p.numel()
        elif "lm_head" in pname:
            by_part["lm_head"] += p.numel()
        else:
            raise AssertionError(f"unexpected parameter {pname}")
    assert by_part == {k: getattr(counts, k) for k in by_part}


def tiny(**changes: object) -> ModelConfig:
    base = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    base.update(changes)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_kv_cache_bytes_match_a_real_cache(kv_heads: int) -> None:
    cfg = tiny(num_key_value_heads=kv_heads)
    model = hf_model(cfg, device="cpu").eval()
    tokens = 11
    with torch.no_grad():
        out = model(torch.randint(0, cfg.vocab_size, (1, tokens)), use_cache=True)
    cache = out.past_key_values
    nbytes = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert nbytes == tokens * budget.kv_cache_bytes_per_token(cfg, "fp32")


def test_flops_per_token_match_flop_counter() -> None:
    """One decode step at context c costs what torch's FLOP counter counts for it."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny()
    model = hf_model(cfg, device="cpu").eval()
    prefix = 9
    with torch.no_grad():
        past = model(torch.randint(0, cfg.vocab_size, (1, prefix)), use_cache=True).past_key_values
        with FlopCounterMode(display=False) as counter:
            model(torch.tensor([[5]]), past_key_values=past, use_cache=True)
    context = prefix + 1  # the new token attends to the prefix and to itself
    assert counter.get_total_flops() == budget.flops_per_token(cfg, context)


def test_weight_bytes_and_max_context_closed_form() -> None:
    cfg = tiny()
    n = budget.param_count(cfg).total
    assert budget.weight_bytes(cfg, "fp32") == 4 * n
    assert budget.weight_bytes(cfg, "int4") == round(n / 2)
    assert budget.weight_bytes(cfg, "int4", group_size=32) == round(n * (4 + 0.5) / 8)
    memory = budget.weight_bytes(cfg, "bf16") + 1000 * budget.kv_cache_bytes_per_token(cfg) + 1
    assert budget.max_context_length(cfg, memory, "bf16") == 1000
    assert budget.max_context_length(cfg, 10, "bf16") == 0


def test_bad_budget_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        budget.weight_bytes(tiny(), "int3")
    with pytest.raises(ValueError, match="context_length"):
        budget.flops_per_token(tiny(), -1)


def test_table_lists_every_model() -> None:
    text = budget.table({name: m.config for name, m in PUBLISHED.items()})
    assert all(name in text for name in PUBLISHED)


@pytest.mark.parametrize("layers", [6, 12, 30])
def test_shape_for_params_hits_the_budget(layers: int) -> None:
    cfg = budget.shape_for_params(125e6, layers, vocab_size=32000)
    assert cfg.num_hidden_layers == layers and cfg.head_dim == 64
    total = budget.param_count(cfg).total
    # no whole-head width either side comes closer to the target
    for heads in (cfg.num_attention_heads - 1, cfg.num_attention_heads + 1):
        other = cfg.replace(
            hidden_size=64 * heads,
            num_attention_heads=heads,
            num_key_value_heads=1,
            intermediate_size=max(64, round(8 / 3 * 64 * heads / 64) * 64),
        )
        assert abs(total - 125e6) <= abs(budget.param_count(other).total - 125e6) + 64 * heads
    assert abs(total / 125e6 - 1) < 0.06
