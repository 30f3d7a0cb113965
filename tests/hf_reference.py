"""Tiny random Hugging Face models made by transformers itself (no download), as references."""

from __future__ import annotations

from pathlib import Path

import torch

from slmlab.models import ModelConfig

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> config: the variants the parity tests must cover.
VARIANTS: dict[str, ModelConfig] = {
    "llama-gqa-untied": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-mha-tied-theta": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        tie_word_embeddings=True,
        rope_theta=500_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
    ),
    "llama-mqa-llama3-rope": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        rope_scaling=LLAMA3_ROPE,
        max_position_embeddings=256,
    ),
    "llama-linear-rope": ModelConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        max_position_embeddings=256,
    ),
    "qwen2-bias": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        model_type="qwen2",
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
    ),
    # The windows are shorter than the tests' 40 tokens, so that they leave keys out.
    "mistral-sliding": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        model_type="mistral",
        sliding_window=7,
        max_position_embeddings=256,
    ),
    "qwen2-sliding-and-full": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        model_type="qwen2",
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256,
    ),
    "mixtral-moe": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        model_type="mixtral",
        num_experts=4,
        num_experts_per_tok=2,
        sliding_window=9,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    ),
    "qwen2-moe-shared-expert": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        model_type="qwen2_moe",
        num_experts=6,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        max_position_embeddings=256,
    ),
    # Chunks shorter than the tests' 40 tokens, so that the state passes between them.
    "bamba-hybrid": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        model_type="bamba",
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mamba_n_heads=8,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_chunk_size=16,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    ),
    # DeepSeek-V3's latent attention: a query latent too, and its interleaved rotary layout.
    "deepseek-latent": ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        model_type="deepseek_v3",
        head_dim=8,
        kv_lora_rank=24,
        q_lora_rank=32,
        qk_nope_head_dim=12,
        v_head_dim=16,
        rope_interleave=True,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    ),
}


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Models start with unit norms and zero biases, which would hide mistakes in either."""
    for name, p in model.named_parameters():
        if name.endswith(("norm.weight", "bias")):
            p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' own model for `config`, with random (seeded) weights and nonzero biases."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    torch.manual_seed(seed)
    return perturb_norms_and_biases(transformers.AutoModelForCausalLM.from_config(hf_config).eval())


def save_hf(config: ModelConfig, path: Path, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    model = hf_model(config, seed)
    model.save_pretrained(path, **save_kwargs)
    return model
