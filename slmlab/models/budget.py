"""Budgets of a model, computed from its config alone: parameters, memory, KV cache and FLOPs.

These are the numbers chapter 01 uses to say what "small" means, and that later chapters use to
predict what quantization or pruning will save before anything is measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .config import ModelConfig

__all__ = [
    "BITS",
    "ParamCount",
    "PublishedModel",
    "flops_per_token",
    "kv_cache_bytes_per_token",
    "max_context_length",
    "param_count",
    "published_models",
    "recurrent_state_bytes",
    "shape_for_params",
    "table",
    "weight_bytes",
]

# Bits per stored weight. int4 here is the bare code; group scales are counted by
# `weight_bytes(..., group_size=...)`, because at small group sizes they are not negligible.
BITS: dict[str, float] = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class ParamCount:
    """Parameters by where they live. ``lm_head`` is 0 when it is tied to the embedding.
    ``idle`` counts the MLP parameters a token leaves unused: the experts its router does not
    pick (0 for a dense model). ``mamba`` counts the Mamba-2 layers that take attention's place
    in a hybrid."""

    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int
    idle: int = 0
    mamba: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mamba + self.mlp + self.norms + self.lm_head

    @property
    def active(self) -> int:
        """Parameters one token runs through: what a mixture of experts' compute pays for."""
        return self.total - self.idle

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embedding and the output head (Kaplan et al.'s N)."""
        return self.attention + self.mamba + self.mlp + self.norms

    @property
    def embedding_share(self) -> float:
        """Fraction of all parameters in the embedding and the (untied) output head."""
        return (self.embedding + self.lm_head) / self.total


def param_count(config: ModelConfig) -> ParamCount:
    """Count the parameters of the model that `config` describes, tensor by tensor."""
    d, L = config.hidden_size, config.num_hidden_layers
    q, kv = config.q_size, config.kv_size
    attention = d * q + 2 * d * kv + q * d  # q, k, v and output projections
    if config.attention_bias:
        attention += q + 2 * kv
    if config.latent:
        attention = _latent_layer_params(config)
    mlp = 3 * d * config.intermediate_size  # gate, up and down projections of SwiGLU
    idle = 0
    if config.num_experts:  # E experts, a router, and maybe a gated shared expert
        expert, shared = 3 * d * config.expert_size, config.shared_expert_intermediate_size
        mlp = config.num_experts * expert + d * config.num_experts
        mlp += (3 * d * shared + d) if shared else 0
        idle = (config.num_experts - config.num_experts_per_tok) * expert
    norms = 2 * d  # one RMSNorm before attention, one before the MLP
    embedding = config.vocab_size * d
    mamba_layers = sum(config.linear_layers)
    return ParamCount(
        embedding=embedding,
        attention=(L - mamba_layers) * attention,
        mlp=L * mlp,
        norms=L * norms + d,  # + the final norm
        lm_head=0 if config.tie_word_embeddings else embedding,
        idle=L * idle,
        mamba=mamba_layers * _mamba_layer_params(config),
    )


def _latent_layer_params(config: ModelConfig) -> int:
    """One layer of latent attention: the query (through its latent and norm, or direct), the
    key-value latent with the shared rotated key, its norm, its expansion, the output."""
    d, heads, rank, rope = (
        config.hidden_size,
        config.num_attention_heads,
        config.kv_lora_rank,
        config.head_dim,
    )
    qk = heads * (config.qk_nope_head_dim + rope)
    r = config.q_lora_rank
    query = d * qk if r is None else d * r + r + r * qk
    keys_values = (
        d * (rank + rope) + rank + rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    )
    return query + keys_values + heads * config.v_head_dim * d


def _mamba_layer_params(config: ModelConfig) -> int:
    """One Mamba-2 layer: the input projection (gate, x, B, C and time steps), the
    convolution, dt_bias, A_log and D per head, the gated norm and the output projection."""
    if not config.mamba_n_heads:
        return 0
    d, inner, heads = config.hidden_size, config.mamba_intermediate_size, config.mamba_n_heads
    channels = inner + 2 * config.mamba_n_groups * config.mamba_d_state
    projected = inner + channels + heads
    params = d * projected + channels * config.mamba_d_conv + 3 * heads + inner + inner * d
    if config.mamba_conv_bias:
        params += channels
    if config.mamba_proj_bias:
        params += projected + d
    return params


def recurrent_state_bytes(config: ModelConfig) -> int:
    """Bytes of the fixed-size state of a hybrid's Mamba-2 layers, per sequence (fp32): it
    does not grow with the context, unlike `kv_cache_bytes_per_token`."""
    if not config.mamba_n_heads:
        return 0
    channels = config.mamba_intermediate_size + 2 * config.mamba_n_groups * config.mamba_d_state
    per_layer = (config.mamba_d_conv - 1) * channels + (
        config.mamba_intermediate_size * config.mamba_d_state
    )
    return 4 * sum(config.linear_layers) * per_layer


def weight_bytes(config: ModelConfig, dtype: str = "bf16", *, group_size: int | None = None) -> int:
    """Bytes to hold every weight in `dtype` (a key of `BITS`).

    With ``group_size``, each group of that many weights also stores one fp16 scale, the way
    group-wise int4/int8 formats do (norms stay in fp16 either way, they are a rounding error).
    """
    if dtype not in BITS:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(BITS)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    bits = BITS[dtype] + (16 / group_size if group_size else 0)
    return round(param_count(config).total * bits / 8)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: str = "bf16") -> int:
    """Bytes the KV cache grows by for every token of context (keys and values, all attention
    layers; a hybrid's Mamba-2 layers keep a state of fixed size instead,
    `recurrent_state_bytes`)."""
    if dtype not in BITS:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(BITS)}")
    attention_layers = len(config.cache_layers) - sum(config.cache_layers)  # each run of a block
    if config.latent:  # the latent and the shared rotated key, whatever the heads
        return round(attention_layers * (config.kv_lora_rank + config.head_dim) * BITS[dtype] / 8)
    return round(2 * attention_layers * config.kv_size * BITS[dtype] / 8)


def flops_per_token(config: ModelConfig, context_length: int = 0) -> int:
    """Forward FLOPs to process one token that attends to `context_length` earlier tokens.

    Every weight of a matrix product costs a multiply and an add (2 FLOPs), the output head
    included even when it is tied; attention adds ``QKᵀ`` and ``A·V`` against the context,
    2 × 2 × heads × head_dim FLOPs per layer per context token. Norms, activations and the
    softmax are left out: they are a fraction of a percent for these shapes. Experts a token
    does not run cost nothing; a sliding layer attends to at most its window. A Mamba-2 layer
    costs its projections and, whatever the context, its convolution (2 FLOPs per tap and
    channel) and its state (decayed, written and read: about 6 FLOPs per entry). Blocks that
    repeat (`block_repeats`) cost every run.
    """
    if context_length < 0:
        raise ValueError(f"context_length must be >= 0, got {context_length}")
    p = param_count(config)
    blocks = p.attention + p.mlp - p.idle
    attention_layers = config.num_hidden_layers - sum(config.linear_layers)
    if config.attention_bias:
        blocks -= attention_layers * (config.q_size + 2 * config.kv_size)
    repeats = config.block_repeats
    matmul_weights = repeats * blocks + config.vocab_size * config.hidden_size
    window = config.sliding_window or context_length + 1  # keys seen, the token itself included
    seen = [
        0 if m else min(context_length, window - 1) if s else context_length
        for s, m in zip(config.sliding_layers, config.linear_layers, strict=True)
    ]
    attention = 4 * config.q_size * sum(seen) * repeats
    if config.latent:  # scores over nope + rope channels, values of v_head_dim, every head
        per_key = config.num_attention_heads * (
            2 * (config.qk_nope_head_dim + config.head_dim) + 2 * config.v_head_dim
        )
        attention = per_key * sum(seen) * repeats
    mamba = 0
    if config.mamba_n_heads:
        inner = config.mamba_intermediate_size
        channels = inner + 2 * config.mamba_n_groups * config.mamba_d_state
        projections = config.hidden_size * (2 * inner + channels + config.mamba_n_heads)
        scan = 2 * config.mamba_d_conv * channels + 6 * inner * config.mamba_d_state
        mamba = sum(config.linear_layers) * (2 * projections + scan)
    return 2 * matmul_weights + attention + mamba


def max_context_length(
    config: ModelConfig, memory_bytes: float, dtype: str = "bf16", kv_dtype: str = "bf16"
) -> int:
    """Longest context whose KV cache fits in `memory_bytes` beside the weights (0: no room).

    The rest of a real process (activations, the runtime, the app) also needs memory, so pass
    the share of the device's memory the model may have, not the whole of it.
    """
    free = memory_bytes - weight_bytes(config, dtype)
    return max(0, int(free // kv_cache_bytes_per_token(config, kv_dtype)))


def shape_for_params(
    params: float,
    num_hidden_layers: int,
    *,
    vocab_size: int,
    head_dim: int = 64,
    query_per_kv: int = 3,
    mlp_ratio: float = 8 / 3,
    tie_word_embeddings: bool = True,
) -> ModelConfig:
    """The config of `num_hidden_layers` layers whose parameter count is closest to `params`.

    Width moves in whole heads of `head_dim`; each key/value head serves about `query_per_kv`
    query heads (the largest whole grouping that fits), and the MLP is `mlp_ratio` times
    wider, rounded to 64, as in Llama and MobileLLM. This is how one compares deep-and-thin
    against wide-and-shallow at equal size.
    """

    def shape(heads: int) -> ModelConfig:
        kv = max(
            d
            for d in range(1, heads + 1)
            if heads % d == 0 and d * query_per_kv <= max(heads, query_per_kv)
        )
        width = heads * head_dim
        return ModelConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=max(64, round(mlp_ratio * width / 64) * 64),
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            tie_word_embeddings=tie_word_embeddings,
        )

    best = shape(1)
    for heads in range(2, 1024):
        config = shape(heads)
        if abs(param_count(config).total - params) < abs(param_count(best).total - params):
            best = config
        if param_count(config).total > params:
            break
    return best


def table(configs: dict[str, ModelConfig], context_length: int = 2048) -> str:
    """A text table of the budgets of several configs, one row each."""
    head = (
        f"{'model':<16} {'params':>8} {'non-emb':>8} {'emb%':>5} {'bf16':>9} {'int4':>9} "
        f"{'KV/token':>9} {'GFLOP/tok':>9}"
    )
    rows = [head, "-" * len(head)]
    for name, cfg in configs.items():
        p = param_count(cfg)
        rows.append(
            f"{name:<16} {p.total / 1e6:>7.0f}M {p.non_embedding / 1e6:>7.0f}M "
            f"{p.embedding_share:>5.0%} {weight_bytes(cfg, 'bf16') / 2**20:>6.0f}MiB "
            f"{weight_bytes(cfg, 'int4', group_size=32) / 2**20:>6.0f}MiB "
            f"{kv_cache_bytes_per_token(cfg) / 1024:>6.1f}KiB "
            f"{flops_per_token(cfg, context_length) / 1e9:>9.2f}"
        )
    return "\n".join(rows)


@dataclass(frozen=True)
class PublishedModel:
    name: str
    hf_id: str
    year: int
    published_params: float
    config: ModelConfig


@cache
def published_models() -> dict[str, PublishedModel]:
    """The published SLM configs that ship with slmlab, by name, smallest first."""
    raw = json.loads(resources.files(__package__).joinpath("published.json").read_text())
    models = {}
    for entry in raw["models"]:
        hf = dict(entry["config"])
        config = ModelConfig.from_hf_dict(hf, source=f"published.json[{entry['name']}]")
        models[entry["name"]] = PublishedModel(
            name=entry["name"],
            hf_id=entry["hf_id"],
            year=entry["year"],
            published_params=entry["published_params"],
            config=config,
        )
    return dict(sorted(models.items(), key=lambda kv: param_count(kv[1].config).total))
