"""The architecture options of the one `DecoderLM`: a sliding window, a mixture of experts,
Mamba-2 layers, latent attention.

Transformers' parity for Mistral, Qwen2 (sliding and full layers), Mixtral and Qwen2-MoE is in
test_decoder.py (both directions, through checkpoints); here: the cache changes nothing, the
window hides exactly what it should, the load-balancing loss is transformers' and its formula's,
the budget counts the parameters the model has, and bad configs are refused by field.
"""

from __future__ import annotations

import pytest
import torch

import slmlab
from slmlab.infer import KVCache
from slmlab.models import ConfigError, DecoderLM, ModelConfig, param_count
from slmlab.models.budget import flops_per_token
from slmlab.models.mlp import SparseMoE, load_balancing_loss, router_loss

from .hf_reference import VARIANTS, perturb_norms_and_biases

NEW = [
    "mistral-sliding",
    "qwen2-sliding-and-full",
    "mixtral-moe",
    "qwen2-moe-shared-expert",
    "bamba-hybrid",
    "deepseek-latent",
]


def model_of(name: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return perturb_norms_and_biases(DecoderLM(VARIANTS[name]).eval())


def ids_of(config: ModelConfig, batch: int = 2, length: int = 30, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("name", NEW)
def test_cached_logits_equal_full_forward(name: str) -> None:
    """Prefill, a chunk continuing the cache, then one token at a time (the compiled step
    where it applies, the blocks where the window or the experts rule it out)."""
    model = model_of(name)
    ids = ids_of(model.config)
    cache = KVCache(model.config, 2, 30)
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :4], cache=cache), model(ids[:, 4:12], cache=cache)]
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_generation_with_the_cache_equals_recomputation(name: str) -> None:
    model = model_of(name)
    prompts = [[5, 17, 3, 99, 42, 7, 8, 9, 10], [11, 12]]  # left-padded together
    with_cache = slmlab.generate(model, prompts, 16, stop_tokens=())
    without = slmlab.generate(model, prompts, 16, stop_tokens=(), use_cache=False)
    assert with_cache == without


def test_the_window_hides_exactly_the_tokens_it_should() -> None:
    """One sliding layer of window W: position t sees positions t-W+1 .. t. Changing token 0
    changes the logits of positions 0 .. W-1 and no others; a full layer sees it everywhere."""
    window, length = 5, 12
    config = VARIANTS["mistral-sliding"].replace(num_hidden_layers=1, sliding_window=window)
    torch.manual_seed(0)
    model = DecoderLM(config, init_std=0.2).eval()  # weights large enough to carry a change
    ids = ids_of(config, batch=1, length=length)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % config.vocab_size
    with torch.no_grad():
        moved = (model(ids) - model(changed)).abs().amax(-1)[0]
    assert bool((moved[:window] > 1e-6).all()) and bool((moved[window:] == 0).all())

    full = DecoderLM(config.replace(model_type="llama", sliding_window=None)).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert bool(((full(ids) - full(changed)).abs().amax(-1) > 1e-6).all())


def test_attention_probs_follow_the_window() -> None:
    config = VARIANTS["mistral-sliding"]
    model = model_of("mistral-sliding")
    x = torch.randn(1, 12, config.hidden_size)
    cos, sin = model.model.rotary_emb(torch.arange(12)[None], torch.float32)
    probs = model.model.layers[0].self_attn.attention_probs(x, cos, sin)[0, 0]
    t, s = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    visible = (s <= t) & (s > t - config.sliding_window)
    assert bool((probs[~visible] == 0).all()) and bool((probs[visible] > 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(12))


def test_packed_rows_slide_within_their_example() -> None:
    """Training rows of several examples: each example sees only itself, through the window,
    as if it were alone."""
    model = model_of("mixtral-moe")
    ids = ids_of(model.config, batch=1, length=24)
    segments = torch.tensor([[0] * 15 + [1] * 9])
    with torch.no_grad():
        packed = model(ids, segments=segments)
        alone = torch.cat((model(ids[:, :15]), model(ids[:, 15:])), dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_load_balancing_loss_is_transformers_and_its_formula() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(40, 6, generator=generator) for _ in range(3)]
    expected = load_balancing_loss_func(tuple(logits), num_experts=6, top_k=2)
    torch.testing.assert_close(load_balancing_loss(logits, 2), expected)
    # Closed forms: an even spread gives k, every token on one expert with certainty gives E.
    even = torch.full((60, 6), -30.0)
    for token in range(60):
        even[token, token % 6] = even[token, (token + 1) % 6] = 30.0
    assert abs(load_balancing_loss([even], 2).item() - 2) < 1e-4
    collapsed = torch.tensor([[60.0, 30.0, 0, 0, 0, 0]]).repeat(60, 1)
    assert abs(load_balancing_loss([collapsed], 2).item() - 6) < 1e-4


def test_training_adds_the_weighted_balance_loss_and_moves_the_router() -> None:
    from slmlab.train import TrainConfig, next_token_loss, train_step

    config = VARIANTS["qwen2-moe-shared-expert"].replace(router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    model = DecoderLM(config).train()
    rows = ids_of(config, batch=4, length=17)
    lm = next_token_loss(model, rows)
    routers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    top_k = config.num_experts_per_tok
    expected = 0.5 * load_balancing_loss([m.router_logits for m in routers], top_k)
    torch.testing.assert_close(router_loss(model), expected)
    assert torch.isfinite(lm)

    shape = {k: v for k, v in config.to_dict().items() if k not in ("vocab_size", "eos_token_id")}
    before = routers[0].gate.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, _ = train_step(model, optimizer, rows, TrainConfig(model=shape, batch_size=4))
    assert loss == pytest.approx(lm.item(), rel=1e-5)  # the loss reported is the model's alone
    assert not torch.equal(routers[0].gate.weight, before)


@pytest.mark.parametrize("name", NEW)
def test_param_count_is_the_models(name: str) -> None:
    config = VARIANTS[name]
    counted = param_count(config)
    assert counted.total == DecoderLM(config).num_parameters()
    if config.num_experts:
        per_expert = 3 * config.hidden_size * config.expert_size
        unused = config.num_experts - config.num_experts_per_tok
        assert counted.total - counted.active == config.num_hidden_layers * unused * per_expert
    else:
        assert counted.active == counted.total


def test_flops_count_the_experts_run_and_the_keys_seen() -> None:
    moe = VARIANTS["mixtral-moe"].replace(sliding_window=None)
    dense = moe.replace(model_type="llama", num_experts=0, num_experts_per_tok=2)
    router = moe.num_hidden_layers * moe.hidden_size * moe.num_experts
    # Two experts of intermediate_size run per token: twice the dense MLP, plus the router.
    mlp = param_count(dense).mlp
    assert flops_per_token(moe) == flops_per_token(dense) + 2 * (mlp + router)
    sliding = VARIANTS["mistral-sliding"]
    window = sliding.sliding_window
    full = sliding.replace(sliding_window=None)
    layers, q = sliding.num_hidden_layers, sliding.q_size
    assert flops_per_token(sliding, 3) == flops_per_token(full, 3)  # within the window
    extra = 4 * layers * q * (100 - (window - 1))
    assert flops_per_token(full, 100) - flops_per_token(sliding, 100) == extra


def test_quantization_reaches_the_experts_by_name() -> None:
    from slmlab.layers.quantized import QuantLinear
    from slmlab.quant import QuantConfig, quantize_

    model = model_of("qwen2-moe-shared-expert")
    ids = ids_of(model.config)
    with torch.no_grad():
        before = model(ids)
    quantize_(model, QuantConfig(bits=8, group_size=16))
    moe = model.model.layers[0].mlp
    assert isinstance(moe.experts[5].down_proj, QuantLinear)
    assert isinstance(moe.shared_expert.up_proj, QuantLinear)
    with torch.no_grad():
        after = model(ids)
    assert (after - before).abs().max().item() < 0.05 * before.abs().max().item()


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        ("mistral-sliding", "gguf", "config.sliding_window is 7"),
        ("qwen2-moe-shared-expert", "onnx", "'model.layers.0.mlp' is a SparseMoE"),
        ("bamba-hybrid", "gguf", "'model.layers.0.mamba' is a Mamba2Mixer"),
        ("deepseek-latent", "onnx", "'model.layers.0.self_attn' is a LatentAttention"),
    ],
)
def test_exporters_refuse_what_they_cannot_write(name, fmt, message, tmp_path) -> None:
    from slmlab.export import ExportError
    from slmlab.export.common import check_plain

    with pytest.raises(ExportError, match=message):
        check_plain(model_of(name), fmt)


BASE = VARIANTS["mixtral-moe"].to_dict()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"num_experts_per_tok": 5},
            r"num_experts_per_tok \(5\) must be between 1 and num_experts \(4\)",
        ),
        ({"num_experts": 0}, "model_type 'mixtral' needs num_experts >= 1"),
        ({"sliding_window": 0}, "sliding_window must be a positive integer, got 0"),
        ({"sliding_window": 512}, r"sliding_window \(512\) is longer than max_position_embeddings"),
        ({"shared_expert_intermediate_size": 8}, "'mixtral' has no shared expert"),
        ({"layer_types": ["full_attention"]}, "layer_types must list one type per layer"),
        ({"model_type": "llama"}, "model_type 'llama' has no sliding window"),
        ({"model_type": "mistral"}, "model_type 'mistral' has a dense MLP"),
        ({"router_aux_loss_coef": -1}, "router_aux_loss_coef must be a number >= 0"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer"),
        (
            {"model_type": "qwen2_moe", "attention_bias": True, "sliding_window": None},
            "'qwen2_moe' always has a shared expert",
        ),
        (
            {
                "model_type": "qwen2",
                "attention_bias": True,
                "num_experts": 0,
                "layer_types": ["x", "y"],
            },
            "layer_types: 'x' is not one of",
        ),
    ],
)
def test_bad_architecture_fields_are_refused_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**BASE, **changes})


LATENT = VARIANTS["deepseek-latent"].to_dict()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kv_lora_rank": 65}, r"kv_lora_rank \(65\) is above hidden_size \(64\)"),
        ({"q_lora_rank": 128}, r"q_lora_rank \(128\) is above hidden_size \(64\)"),
        ({"kv_lora_rank": 0}, "kv_lora_rank must be a positive integer for 'deepseek_v3'"),
        ({"num_key_value_heads": 2}, "num_key_value_heads must equal num_attention_heads"),
        ({"sliding_window": 8}, "latent attention over dense MLPs here: no sliding_window"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling is not supported"),
        ({"model_type": "llama"}, "kv_lora_rank, q_lora_rank, qk_nope_head_dim and v_head_dim are"),
    ],
)
def test_bad_latent_attention_fields_are_refused_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**LATENT, **changes})


def test_deepseeks_mixture_of_experts_is_refused_not_misread() -> None:
    hf = VARIANTS["deepseek-latent"].to_hf_dict()
    assert ModelConfig.from_hf_dict(hf) == VARIANTS["deepseek-latent"]
    with pytest.raises(
        ConfigError, match=r"first_k_dense_replace \(1\) is below num_hidden_layers"
    ):
        ModelConfig.from_hf_dict({**hf, "first_k_dense_replace": 1})


def test_the_latent_cache_holds_the_latent_and_the_shared_key() -> None:
    """What latent attention is for: per token and layer, kv_lora_rank + rotated channels,
    whatever the number of heads (here 24 + 8 against 2 × 4 heads × 8 channels)."""
    from slmlab.models.budget import kv_cache_bytes_per_token

    config = VARIANTS["deepseek-latent"]
    cache = KVCache(config, 1, 10)
    assert cache.nbytes() == 10 * kv_cache_bytes_per_token(config, "fp32")
    assert kv_cache_bytes_per_token(config, "fp32") == 2 * (24 + 8) * 4
    ordinary = config.replace(model_type="llama", kv_lora_rank=0, q_lora_rank=None,
                              qk_nope_head_dim=0, v_head_dim=0, rope_interleave=False)  # fmt: skip
    assert kv_cache_bytes_per_token(ordinary, "fp32") == 2 * 2 * 4 * 8 * 4


def test_hf_configs_with_options_slmlab_lacks_are_refused(tmp_path) -> None:
    hf = VARIANTS["mixtral-moe"].to_hf_dict()
    with pytest.raises(ConfigError, match="router_jitter_noise is not supported"):
        ModelConfig.from_hf_dict({**hf, "router_jitter_noise": 0.1})
    qwen = VARIANTS["qwen2-moe-shared-expert"].to_hf_dict()
    with pytest.raises(ConfigError, match="every layer must have experts"):
        ModelConfig.from_hf_dict({**qwen, "mlp_only_layers": [0]})
    assert ModelConfig.from_hf_dict(hf) == VARIANTS["mixtral-moe"]
    assert ModelConfig.from_hf_dict(qwen) == VARIANTS["qwen2-moe-shared-expert"]


@pytest.mark.parametrize("name", ["mixtral-moe", "deepseek-latent"])
def test_the_batcher_gives_each_request_its_own_tokens(name: str) -> None:
    """Rows join and leave one cache at different offsets; the window counts each row's own
    tokens, the experts route each token alone, and latents move with their rows."""
    from slmlab.infer import BatchRequest, ContinuousBatcher

    model = model_of(name)
    batcher = ContinuousBatcher(model, max_batch=2, max_len=48)
    prompts = [[5, 17, 3, 99, 42, 7, 8, 9, 10, 11, 12], [11, 12], [60, 61, 62, 63, 64]]
    requests = [batcher.submit(BatchRequest(p, 14, temperature=0.0)) for p in prompts]
    while not batcher.idle:
        batcher.step()
    for prompt, request in zip(prompts, requests, strict=True):
        alone = slmlab.generate(model, [prompt], 14, stop_tokens=())[0]
        assert request.tokens == alone[len(prompt) :]


def test_transforms_for_dense_mlps_refuse_experts_by_layer() -> None:
    from slmlab.prune.structured import mlp_channel_importance
    from slmlab.quant import QuantConfig, quantize_

    model = model_of("qwen2-moe-shared-expert")
    calibration = ids_of(model.config, batch=8, length=32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp is a mixture of experts"):
        mlp_channel_importance(model, calibration)
    with pytest.raises(ValueError, match="folds scales into dense MLPs only"):
        quantize_(model, QuantConfig(method="awq", group_size=16), calibration=calibration)


def test_dropped_blocks_take_their_window_with_them(tmp_path) -> None:
    """Removing a block of a sliding/full/sliding model leaves sliding/sliding, in the config
    and in the blocks: saved and loaded again, the model gives the same logits."""
    from slmlab.prune.structured import drop_layers_

    model = drop_layers_(model_of("qwen2-sliding-and-full"), [1])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    ids = ids_of(model.config)
    slmlab.save(model, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(slmlab.load(tmp_path / "ckpt")(ids), model(ids))


@pytest.mark.parametrize("name", NEW)
def test_speculative_decoding_keeps_the_greedy_tokens(name: str) -> None:
    """Drafts checked in chunks and rolled back when refused: the tokens of plain greedy
    decoding, window and experts included."""
    from slmlab.infer.speculative import speculative_generate

    torch.manual_seed(0)
    model = DecoderLM(VARIANTS[name], init_std=0.2).eval()
    prompt = [5, 17, 3, 99, 42, 7, 8, 9, 5, 17, 3]
    plain = slmlab.generate(model, [prompt], 24, stop_tokens=())[0]
    drafted = speculative_generate(model, prompt, 24, draft="prompt-lookup", stop_tokens=())
    assert drafted.ids == plain and drafted.drafted > 0


def test_transforms_leave_the_router_as_it_is_by_default() -> None:
    """Quantization and pruning over every linear layer keep the head and the routers (which
    every token reads to choose its experts), as llama.cpp's quantizer does."""
    from slmlab.prune import PruneConfig, prune_
    from slmlab.quant import QuantConfig, quantize_

    model = quantize_(model_of("qwen2-moe-shared-expert"), QuantConfig(bits=4, group_size=16))
    moe = model.model.layers[1].mlp
    assert type(moe.gate) is torch.nn.Linear and type(moe.shared_expert_gate) is torch.nn.Linear
    pruned = prune_(model_of("mixtral-moe"), PruneConfig("magnitude", sparsity=0.5))
    router = pruned.model.layers[0].mlp.gate.weight
    assert bool((router != 0).all())
    assert float((pruned.model.layers[0].mlp.experts[0].up_proj.weight == 0).float().mean()) == 0.5


def test_transforms_that_need_key_and_value_projections_refuse_latent_attention() -> None:
    """Head pruning cuts key/value groups and smoothing folds scales into q, k and v: latent
    attention has neither, and says so instead of failing inside."""
    from slmlab.prune import prune_heads_
    from slmlab.quant import QuantConfig, quantize_
    from slmlab.quant.smoothing import scale_groups

    model = model_of("deepseek-latent")
    scores = [torch.ones(4) for _ in model.model.layers]
    with pytest.raises(ValueError, match="read one shared latent"):
        prune_heads_(model, 2, scores)
    with pytest.raises(ValueError, match="attention is latent"):
        next(scale_groups(model.model.layers[0]))
    quantize_(model, QuantConfig(bits=8, group_size=8))  # round to nearest reaches every layer
    assert type(model.model.layers[0].self_attn.kv_b_proj).__name__ == "QuantLinear"


def _shared_and_unrolled(repeats: int = 2) -> tuple[DecoderLM, DecoderLM]:
    """A model whose blocks each run `repeats` times, and the same model written out: a block
    per run, each a copy of the shared one (the reference sharing must equal)."""
    base = VARIANTS["llama-gqa-untied"]
    torch.manual_seed(0)
    shared = perturb_norms_and_biases(DecoderLM(base.replace(block_repeats=repeats)).eval())
    layers = base.num_hidden_layers
    unrolled = DecoderLM(base.replace(num_hidden_layers=layers * repeats)).eval()
    state = {}
    for name, tensor in shared.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            for r in range(repeats):
                state[f"model.layers.{int(i) * repeats + r}.{rest}"] = tensor
        else:
            state[name] = tensor
    unrolled.load_state_dict(state)
    return shared, unrolled


def test_shared_blocks_are_the_deeper_model_with_copied_weights(tmp_path) -> None:
    """MobileLLM's block-wise sharing: each block run twice in a row is the model of twice the
    depth whose blocks are copies, in logits, in cached decoding, and through a checkpoint;
    the budget counts the shared weights once and the runs' compute and cache twice."""
    from slmlab.models.budget import kv_cache_bytes_per_token

    shared, unrolled = _shared_and_unrolled()
    ids = ids_of(shared.config)
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), unrolled(ids), rtol=0, atol=1e-5)
    prompts = [[5, 17, 3, 99, 42, 7, 8, 9, 10], [11, 12]]
    cached = slmlab.generate(shared, prompts, 12, stop_tokens=())
    assert cached == slmlab.generate(shared, prompts, 12, stop_tokens=(), use_cache=False)
    assert cached == slmlab.generate(unrolled, prompts, 12, stop_tokens=())
    slmlab.save(shared, tmp_path / "shared")
    with torch.no_grad():
        torch.testing.assert_close(slmlab.load(tmp_path / "shared")(ids), shared(ids))
    config, deep = shared.config, unrolled.config
    assert param_count(config).total == shared.num_parameters() < unrolled.num_parameters()
    assert flops_per_token(config, 50) == flops_per_token(deep, 50)
    assert kv_cache_bytes_per_token(config) == kv_cache_bytes_per_token(deep)
    assert KVCache(config, 1, 8).nbytes() == KVCache(deep, 1, 8).nbytes()


def test_shared_blocks_refuse_what_walks_each_block_once(tmp_path) -> None:
    from slmlab.export.common import ExportError, check_plain
    from slmlab.quant import QuantConfig, quantize_

    shared, _ = _shared_and_unrolled()
    calibration = ids_of(shared.config, batch=8, length=32)
    with pytest.raises(ValueError, match="block_repeats is 2: each block runs 2 times"):
        quantize_(shared, QuantConfig(method="gptq", group_size=16), calibration=calibration)
    with pytest.raises(ExportError, match=r"config\.block_repeats is 2"):
        check_plain(shared, "gguf")
    with pytest.raises(ConfigError, match="block_repeats must be a positive integer, got 0"):
        VARIANTS["llama-gqa-untied"].replace(block_repeats=0)
    with pytest.raises(ConfigError, match="block_repeats with Mamba-2 layers is not supported"):
        VARIANTS["bamba-hybrid"].replace(block_repeats=2)
