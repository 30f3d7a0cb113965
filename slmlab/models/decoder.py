"""The decoder-only transformer, built from named parts that a chapter can show one at a time.

Module and parameter names follow Hugging Face's Llama (``model.layers.0.self_attn.q_proj``...),
so a state dict *is* a Hugging Face state dict and checkpoints need no renaming table.

Shapes: B batch, T new tokens, S tokens attended to (cache + new), H query heads, K key/value
heads, D head_dim. Key/value heads are shared by groups of H/K query heads (MHA when K = H,
GQA when 1 < K < H, MQA when K = 1).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels import (
    GEMV_MAX_ROWS,
    INT4_MAX_ROWS_INT8,
    StepContext,
    cpu_kernels,
    decode_step,
    decode_tokens,
    embedding_operands,
    fused_operands,
    linear,
    linear_many,
)
from .config import ModelConfig
from .mla import LatentAttention
from .mlp import SparseMoE, SwiGLU
from .norm import RMSNorm
from .rope import apply_rope, inverse_frequencies
from .ssm import Mamba2Mixer

__all__ = [
    "Attention",
    "DecoderBlock",
    "DecoderLM",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "recent_keys",
]


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary angles, indexed by token position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        # Channels i and i + D/2 turn by the same angle; the first half's sine carries the minus
        # sign of rotate_half, so applying the rotation is two fused operations (see apply_rope).
        self.register_buffer(
            "cos", torch.cat((angles.cos(), angles.cos()), dim=-1), persistent=False
        )
        self.register_buffer(
            "sin", torch.cat((-angles.sin(), angles.sin()), dim=-1), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for `positions` (B, T), shaped (B, 1, T, D) to broadcast over heads."""
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond max_position_embeddings "
                f"({self.cos.shape[0]}); shorten the input or raise max_position_embeddings"
            )
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(
            dtype
        )


class KVCache:
    """Preallocated keys and values for every layer: decoding writes in place, never reallocates.

    ``keys[i]`` and ``values[i]`` are (B, K, max_len, D) for layer i (latent attention keeps
    its latent as the keys and its shared rotated key as the values, one "head" each);
    ``length`` is how many positions are filled. ``key_mask`` (B, max_len) is False where a position holds padding
    (left-padded prompts of a batch), so attention never looks at it. A Mamba-2 layer keeps no
    keys (its tensors have no positions) but a fixed-size state instead: ``conv_states[i]`` (B,
    width − 1, channels), its convolution's last inputs, and ``ssm_states[i]`` (B, heads,
    head_dim, d_state), always fp32. Such a state holds every token it has read, so it cannot
    be cut back to an earlier length, only saved and restored (`snapshot`, `restore`).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        linear_layers = config.cache_layers

        def kv(width: int, heads: int = config.num_key_value_heads) -> list[torch.Tensor]:
            shapes = [(batch_size, heads, 0 if m else max_len, width) for m in linear_layers]
            return [torch.zeros(s, dtype=dtype, device=device) for s in shapes]

        if config.latent:  # one latent and one shared rotated key a token (`LatentAttention`)
            self.keys, self.values = kv(config.kv_lora_rank, 1), kv(config.head_dim, 1)
        else:
            self.keys, self.values = kv(config.head_dim), kv(config.head_dim)
        conv = (batch_size, config.mamba_d_conv - 1, Mamba2Mixer.conv_channels(config))
        ssm = (batch_size, config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state)
        mamba = [i for i, m in enumerate(linear_layers) if m]
        self.conv_states = {i: torch.zeros(conv, device=device) for i in mamba}
        self.ssm_states = {i: torch.zeros(ssm, device=device) for i in mamba}
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        if value == 0:  # a fresh start: the states forget too
            for t in self.states:
                t.zero_()
        elif value < self._length and self.ssm_states:
            raise ValueError(
                f"cannot cut a cache with Mamba-2 states back from {self._length} to {value} "
                "tokens: a state holds every token it has read; save it with snapshot() and "
                "go back with restore()"
            )
        self._length = value

    @property
    def states(self) -> list[torch.Tensor]:
        """The Mamba-2 layers' states, convolutions' then scans' (empty without such layers)."""
        return [*self.conv_states.values(), *self.ssm_states.values()]

    def snapshot(self) -> tuple[int, list[torch.Tensor]]:
        """What `restore` needs to bring the cache back to this moment: the length and a copy
        of the fixed-size states (keys and values past the length are simply overwritten)."""
        return self._length, [t.clone() for t in self.states]

    def restore(self, snapshot: tuple[int, list[torch.Tensor]]) -> None:
        length, saved = snapshot
        for t, copy in zip(self.states, saved, strict=True):
            if t is not copy:
                t.copy_(copy)
        self._length = length

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.states]
        return sum(t.numel() * t.element_size() for t in tensors)

    def make_room(self, count: int) -> None:
        """Called before `count` new tokens are stored, so that a cache that evicts can do it
        then (`slmlab.infer.SinkKVCache`); this one only grows, and `span` refuses to
        overflow."""

    def span(self, count: int) -> tuple[int, int]:
        """The positions [start, end) that `count` new tokens will fill; an error if full."""
        start, end = self.length, self.length + count
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        return start, end

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, K, T, D) of `layer`; return every key and value so far."""
        start, end = self.span(k.shape[2])
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass(frozen=True)
class KeptPositions:
    """The positions of rows (B, T) a training pass computes, `mask` True at them, and their
    indices in reading order. The per-token layers (norms, projections, MLP) run on the kept
    positions alone, as (N, hidden) rows; attention scatters them back into their rows, where
    causal attention never reads the zeros left at the positions dropped after each row's
    last kept one."""

    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> KeptPositions:
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(mask, rows, cols)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the kept positions' entries."""
        return x[self.rows, self.cols]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the positions not kept."""
        out = x.new_zeros(*self.mask.shape, x.shape[-1])
        return out.index_put((self.rows, self.cols), x)


class Attention(nn.Module):
    """Multi-head attention with any number of key/value heads, through PyTorch's fused SDPA.
    `sliding_window` (None: every earlier token) is how many tokens a query sees, itself
    included, in a sliding layer; the mask the model passes in already says so."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.sliding_window = config.sliding_window if config.sliding_layers[layer_index] else None
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)

    def rotated_qkv(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kept: KeptPositions | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, K, T, D); queries and keys rotated. `x`
        is (B, T, hidden), or (N, hidden) at the `kept` positions of B rows of T."""
        q, k, v = linear_many(x, [self.q_proj, self.k_proj, self.v_proj])
        if kept is not None:
            q, k, v = kept.scatter(q), kept.scatter(k), kept.scatter(v)
        B, T, _ = q.shape
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        slot: int | None = None,
        kept: KeptPositions | None = None,
    ) -> torch.Tensor:
        """`slot` is the cache's for this run of the block (its layer index unless the blocks
        repeat). With `kept`, `x` and the output are (N, hidden), the kept positions' rows."""
        q, k, v = self.rotated_qkv(x, cos, sin, kept)
        B, _, T, _ = q.shape
        if cache is not None:
            k, v = cache.update(self.layer_index if slot is None else slot, k, v)
        # mask None means plain causal attention over exactly these T tokens.
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, -1)
        return linear(out if kept is None else kept.gather(out), self.o_proj)

    @torch.no_grad()
    def attention_probs(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The causal attention weights (B, H, T, T) this layer gives `x`: for plots.

        The same projections and rotations as `forward`, with the softmax written out, because
        the fused kernel of `forward` never materialises the weights.
        """
        T = x.shape[1]
        q, k, _ = self.rotated_qkv(x, cos, sin)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # each group's k
        scores = q @ k.transpose(-1, -2) / self.head_dim**0.5
        visible = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.sliding_window is not None:
            visible = visible & recent_keys(0, T, self.sliding_window, x.device)
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)


def recent_keys(start: int, count: int, window: int, device: torch.device) -> torch.Tensor:
    """(count, start + count): True where key j is among the `window` latest tokens of query
    `start + i` (itself included), the sliding window's mask before the causal one."""
    keys = torch.arange(start + count, device=device)
    queries = start + torch.arange(count, device=device)[:, None]
    return keys > queries - window


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x)). The MLP is a
    SwiGLU, or a mixture of SwiGLU experts when the config has experts. In a
    ``"linear_attention"`` layer a Mamba-2 mixer (``mamba``) takes attention's place
    (``self_attn``); with ``kv_lora_rank`` attention is latent (`slmlab.models.mla`)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.linear_layers[layer_index]:
            self.mamba = Mamba2Mixer(config, layer_index)
        elif config.latent:
            self.self_attn = LatentAttention(config, layer_index)
        else:
            self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if config.num_experts else SwiGLU(config)

    @property
    def slides(self) -> bool:
        """Whether this block's attention is a sliding window's (it takes that mask)."""
        attention = getattr(self, "self_attn", None)
        return attention is not None and attention.sliding_window is not None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        *,
        real: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
        slot: int | None = None,
        kept: KeptPositions | None = None,
    ) -> torch.Tensor:
        """`mask` is attention's; a Mamba-2 layer reads `real` (False at padding) and
        `resets` (True where a packed example starts) instead. `slot` is this run's place in
        the cache when blocks repeat. With `kept` (plain attention only), `x` is (N, hidden):
        the kept positions of the rows."""
        if hasattr(self, "mamba"):
            x = x + self.mamba(self.input_layernorm(x), real, resets, cache)
        elif kept is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot, kept)
        else:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Token embedding, the blocks and the final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


# The most new tokens per row the fused step takes: a speculative draft and the token after
# it. Beyond a few, the products are no longer bound by reading the weights, and the blocks'
# matrix products win; up to here, the head's product is gemv's too (`GEMV_MAX_ROWS`).
FUSED_MAX_TOKENS = GEMV_MAX_ROWS

# A prompt of a small model goes through the fused step too, while its tokens (a row's) times
# one block's weights stay under this: there the blocks' own forward costs a few hundred dispatched
# operators, not arithmetic. Measured on 2 cores of a Xeon (AVX-512), a 12-token prompt of
# stories-8m (0.9M weights a block): 5.8 ms through the blocks, 2.2 in the step; break-even
# near 60 tokens. SmolLM2-135M (3.5M a block): 56 against 46 ms at 12 tokens, 87 against 117
# at 48; so about 45 tokens for the one, 11 for the other.
FUSED_PREFILL_WEIGHTS = 40_000_000

# The step's operands, gathered once per model: gathering walks every projection of every
# block, hundreds of attribute lookups that cost as much as the step itself for a small model.
# A gathered plan is valid while no module, parameter or buffer is registered or assigned
# anywhere (PyTorch's global registration hooks count them) and no projection has a hook.
_registrations = 0


def _count_registration(*args: object) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_module_registration_hook(_count_registration)
nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_buffer_registration_hook(_count_registration)


@dataclass
class _FusedPlan:
    registrations: int
    blocks: int
    hooks: list[dict]  # every projection's forward hooks and pre-hooks, watched for additions
    layers: list[list[torch.Tensor]] | None  # None: some projection offers no operands
    head: list[torch.Tensor] | None  # the final norm's weight and the head's operands, or None


_plans: weakref.WeakKeyDictionary[nn.Module, dict[bool, _FusedPlan]] = weakref.WeakKeyDictionary()


def _gather_operands(model: DecoderLM, rows: int) -> list[list[torch.Tensor]] | None:
    none = torch.empty(0)
    layers = []
    config = model.config
    if config.mamba_n_heads or config.latent or config.rotary_dim != config.head_dim:
        return None  # the step knows ordinary attention with a full rotary embedding
    if config.block_repeats > 1:
        return None  # ... and each block once
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        if not isinstance(mlp, SwiGLU):
            return None  # the step knows one MLP, the dense SwiGLU
        unbiased = (attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(getattr(m, "bias", None) is not None for m in unbiased):
            return None  # the step adds biases to q, k and v only, as the architectures do
        projections = [
            fused_operands(m, rows) for m in (attn.q_proj, attn.k_proj, attn.v_proj, *unbiased)
        ]
        if any(p is None for p in projections):
            return None
        q, k, v, o, gate, up, down = projections
        biases = [getattr(m, "bias", None) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        layers.append(
            [
                block.input_layernorm.weight,
                *q,
                *k,
                *v,
                *(none if b is None else b for b in biases),
                *o,
                block.post_attention_layernorm.weight,
                *gate,
                *up,
                *down,
            ]
        )
    return layers


def _gather_head(model: DecoderLM, rows: int) -> list[torch.Tensor] | None:
    norm, head = model.model.norm, model.lm_head
    if type(norm) is not RMSNorm or norm.weight.dtype is not torch.float32:
        return None
    if getattr(head, "bias", None) is not None:
        return None
    operands = fused_operands(head, rows)
    return None if operands is None else [norm.weight, *operands]


def _fused_plan(model: DecoderLM, rows: int) -> _FusedPlan:
    """The operands of every block, and of the final norm and head, for `rows` new tokens: the
    model's plan while it is valid, gathered afresh otherwise."""
    integer_rows = rows <= INT4_MAX_ROWS_INT8  # whether int4 projections take part
    plans = _plans.setdefault(model, {})
    plan = plans.get(integer_rows)
    if (
        plan is None
        or plan.registrations != _registrations
        or plan.blocks != len(model.model.layers)
        or any(plan.hooks)
    ):
        projections = [
            m
            for block in model.model.layers
            for part in (getattr(block, "self_attn", None), block.mlp)
            if part is not None
            for m in part.children()
        ]
        hooks = [h for m in projections for h in (m._forward_hooks, m._forward_pre_hooks)]
        plan = _FusedPlan(
            _registrations,
            len(model.model.layers),
            hooks,
            _gather_operands(model, rows),
            _gather_head(model, rows),
        )
        plans[integer_rows] = plan
    return plan


@dataclass
class _StepInputs:
    x: torch.Tensor  # the new tokens' ids (B, T), or their embeddings (B, T, d)
    embedding: list[torch.Tensor] | None  # the table the ids are looked up in; None for embeddings
    plan: _FusedPlan


def _block_weights(config: ModelConfig) -> int:
    """The weights of one block's projections."""
    d, head = config.hidden_size, config.head_dim
    attention = d * head * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    return attention + 3 * d * config.intermediate_size


def _step_plan(
    model: DecoderLM, total: int, longest: int, advance: int, cache: KVCache, logits: bool
) -> _FusedPlan | None:
    """The plan for `total` new tokens, at most `longest` of them a row's, that move the
    cache's end by `advance`; None where the step does not apply."""
    if torch.is_grad_enabled():
        return None
    if (
        longest > FUSED_MAX_TOKENS
        and longest * _block_weights(model.config) > FUSED_PREFILL_WEIGHTS
    ):
        return None
    window = model.config.sliding_window
    if window is not None and cache.length + advance > window:
        return None  # the step attends to the whole cache; a window would leave some out
    if (
        cache.keys[0].dtype is not torch.float32
        or cache.keys[0].device.type != "cpu"
        or model.model.rotary_emb.cos.dtype is not torch.float32
    ):
        return None
    plan = _fused_plan(model, total)
    if plan.layers is None:
        return None
    if logits:
        norm, head = model.model.norm, model.lm_head
        if plan.head is None or any(m._forward_hooks or m._forward_pre_hooks for m in (norm, head)):
            return None
    return plan


def _takes_embedding(model: DecoderLM) -> bool:
    embed = model.model.embed_tokens
    plain = getattr(embed, "weight", None) is not None and embed.weight.dtype is torch.float32
    return plain or embedding_operands(embed) is not None


def takes_fused_step(model: DecoderLM, rows: int, tokens: int, cache: KVCache) -> bool:
    """Whether `model`'s forward continues `cache` by `tokens` new tokens in each of `rows`
    rows through the compiled step (which computes every row as it would alone, padding or
    not), rather than through its blocks."""
    plan = _step_plan(model, rows * tokens, tokens, tokens, cache, True)
    return plan is not None and _takes_embedding(model)


def takes_ragged_step(model: DecoderLM, row_tokens: list[int], cache: KVCache) -> bool:
    """Whether `fused_decode_step` continues `cache` with rows of `row_tokens` new tokens
    each, every row's last at the cache's end (a newcomer's prompt beside running rows)."""
    plan = _step_plan(model, sum(row_tokens), max(row_tokens), 1, cache, True)
    return plan is not None and _takes_embedding(model) and cpu_kernels() is not None


def _step_inputs(
    model: DecoderLM,
    input_ids: torch.Tensor,
    cache: KVCache,
    logits: bool,
    row_tokens: list[int] | None = None,
) -> _StepInputs | None:
    """What the compiled step needs to continue `cache` by `input_ids`, or None where it does
    not apply (see `fused_decode_step`)."""
    if input_ids.device.type != "cpu":
        return None
    if row_tokens is None:
        B, T = input_ids.shape
        plan = _step_plan(model, B * T, T, T, cache, logits)
    else:
        plan = _step_plan(model, input_ids.numel(), max(row_tokens), 1, cache, logits)
    if plan is None:
        return None
    embed = model.model.embed_tokens
    table = embedding_operands(embed)
    if table is not None:
        return _StepInputs(input_ids, table, plan)  # looked up in the step
    x = embed(input_ids)
    return _StepInputs(x, None, plan) if x.dtype is torch.float32 else None


def _step_context(model: DecoderLM, cache: KVCache) -> StepContext:
    config, rotary = model.config, model.model.rotary_emb
    return StepContext(
        [[k, v] for k, v in zip(cache.keys, cache.values, strict=True)],
        cache.key_mask,
        rotary.cos,
        rotary.sin,
        cache.length,
        config.rms_norm_eps,
        config.num_attention_heads,
        config.num_key_value_heads,
    )


def fused_decode_step(
    model: DecoderLM,
    input_ids: torch.Tensor,
    cache: KVCache,
    *,
    logits: bool = False,
    last_only: bool = False,
    row_tokens: list[int] | None = None,
) -> torch.Tensor | None:
    """Every block of `model` for a few new tokens per row that continue `cache`, through the
    compiled step (`slmlab.kernels.decode_step`): the residual stream (B, T, d) after the last
    block, the cache filled exactly as the blocks' own forward would fill it; with `logits`,
    the final norm and the head too, in the same call: the logits (B, T, vocab), or (B, 1,
    vocab) for each row's last token where `last_only`. None where the step does not apply
    (autograd, another device or dtype, more than `FUSED_MAX_TOKENS` new tokens a row unless
    they are few enough for `FUSED_PREFILL_WEIGHTS`, a projection that offers
    no operands the step takes: `slmlab.kernels.fused_operands`; with `logits`, a norm or head
    the step does not know or that is watched by a hook), and the caller runs the blocks
    itself. The new tokens' positions come from the cache's `key_mask`, as the blocks number
    them. The cache's length is left to the caller.

    With `row_tokens`, the rows take different numbers of tokens, given one row's after
    another in `input_ids` (N,), and each row's last lands at the cache's position `length`
    (see `slmlab.kernels.decode_step`): the key mask must be true at every new token's place.
    Returns (N, d), the logits (N, vocab), or (B, 1, vocab) where `last_only`."""
    inputs = _step_inputs(model, input_ids, cache, logits, row_tokens)
    if inputs is None:
        return None
    final = inputs.plan.head if logits else None
    return decode_step(
        inputs.x,
        inputs.plan.layers,  # type: ignore[arg-type]
        _step_context(model, cache),
        embedding=inputs.embedding,
        final_norm=None if final is None else final[0],
        head=None if final is None else final[1:],
        last_only=last_only,
        row_tokens=row_tokens,
    )


def fused_decode_tokens(
    model: DecoderLM,
    input_ids: torch.Tensor,
    cache: KVCache,
    steps: int,
    *,
    min_confidence: float = 0.0,
    temperature: float = 1.0,
    races: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The model's choice after each token, in one compiled call
    (`slmlab.kernels.decode_tokens`): after each of `input_ids` (B, T), continuing `cache`,
    then after each choice fed back, `steps` choices after the last input in all; (B, T +
    steps - 1). A choice is the greedy one, what the model's forward and argmax choose one call
    at a time; with `races` (B, steps, vocab) of Exp(1) draws, the choices after the last input
    and after each choice fed back are drawn from the softmax at `temperature` (the draw of
    `slmlab.infer.generate.draw` given those races), and their distributions come back too (B, steps
    taken, vocab). With `min_confidence`, the choices end early after one whose probability
    (every row's) was below it. The cache takes in every token but the last choice (its length
    is updated). None where the step does not apply (see `fused_decode_step`; the ids must be
    looked up in the step: `slmlab.kernels.embedding_operands`)."""
    inputs = _step_inputs(model, input_ids, cache, logits=True)
    if inputs is None or inputs.embedding is None:
        return None
    if cache.length + input_ids.shape[1] + steps - 1 > cache.max_len:
        return None  # the blocks' path says the cache is full
    head = inputs.plan.head
    assert head is not None and inputs.plan.layers is not None
    out = decode_tokens(
        inputs.x,
        inputs.embedding,
        inputs.plan.layers,
        _step_context(model, cache),
        head[0],
        head[1:],
        steps,
        min_confidence=min_confidence,
        temperature=temperature,
        races=races,
    )
    if out is None:
        return None
    chosen, probs = out
    cache.length += chosen.shape[1]
    taken = chosen.shape[1] - input_ids.shape[1] + 1
    return chosen, None if probs is None else probs[:, :taken]


def _check_marks(logits_at: torch.Tensor, shape: torch.Size) -> None:
    if logits_at.shape != shape:
        raise ValueError(
            f"logits_at has shape {tuple(logits_at.shape)}; it marks the positions of the "
            f"output, {tuple(shape)}"
        )


class DecoderLM(nn.Module):
    """A Llama-family causal language model: token ids in, next-token logits out.

    `activation_checkpointing` (off by default; a training run's config turns it on) keeps
    only each block's input while training and recomputes the block in the backward pass:
    activation memory falls from every block's intermediates to one block's, for about one more
    forward pass of compute, and the gradients are the same. `residual_dtype` (None: the
    embedding's) is the dtype the hidden state enters each block in while training: bf16 halves
    what a checkpointed block keeps (``TrainConfig.precision`` ``bf16-residual``)."""

    def __init__(self, config: ModelConfig, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.residual_dtype: torch.dtype | None = None
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters(init_std)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With a tied config, make the head read the embedding's table: the same parameter,
        or, for an embedding that stores its table another way (quantized codes), the module
        its ``as_head()`` returns."""
        if not self.config.tie_word_embeddings:
            return
        embedding = self.model.embed_tokens
        if hasattr(embedding, "as_head"):
            self.lm_head = embedding.as_head()
        else:
            self.lm_head.weight = embedding.weight

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, unit norms: the initialisation of GPT-2 and Llama."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
        head: bool = True,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for `input_ids` (B, T).

        `attention_mask` (B, T) marks real tokens with 1 and padding with 0 (pad on the left for
        generation). With a `cache`, the tokens continue what the cache holds. `last_only`
        computes logits for the last position alone, which is all decoding needs. `segments`
        (B, T) numbers the examples packed into each row (`slmlab.data.chat.pack_examples`): a
        token attends only to its own example, whose positions count from its first token.
        `head` False stops before the output head: the final normed hidden states (B, T,
        hidden), for a loss that applies the head a few positions at a time (distillation).
        `logits_at` (B, T), boolean, keeps only the positions it marks, as (N, vocab) rows in
        reading order: a fine-tuning loss learns a few reply tokens of each row, and the head
        over SmolLM2's 49,152 tokens costs a fifth of its forward pass. Without a cache or an
        `attention_mask`, the positions after each row's last marked one are not computed at
        all (see `_forward_rows`).
        """
        if segments is not None and (attention_mask is not None or cache is not None):
            raise ValueError("segments are for training rows: no attention_mask, no cache")
        if segments is not None or (
            logits_at is not None and attention_mask is None and cache is None
        ):
            return self._forward_rows(input_ids, segments, last_only, head, logits_at)
        B, T = input_ids.shape
        if cache is not None:
            cache.make_room(T)
        start = cache.length if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if cache is not None:
                cache.key_mask[:, start : start + T] = attention_mask
        rotary = self.model.rotary_emb
        if cache is not None and start + T <= rotary.cos.shape[0]:
            # Decoding a few tokens: the compiled step runs every block in one call where it
            # applies (CPU, fp32, plain or 4-bit linear layers), and the final norm and head
            # too when logits are asked for; it computes what the blocks below compute.
            out = self._fused(input_ids, cache, last_only, head, logits_at)
            if out is not None:
                return out
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None:
            padded = padded or not bool(cache.key_mask[:, : start + T].all())
        real = None  # which new tokens are not padding, for Mamba-2 layers
        if padded:
            assert cache is not None or attention_mask is not None
            key_mask = cache.key_mask[:, : start + T] if cache is not None else attention_mask
            real = key_mask[:, start:]
            # Positions count real tokens only, so a left-padded prompt starts at position 0.
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            causal = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(start)
            mask = causal & key_mask[:, None, None, :]
            # A padding query would attend to nothing (NaN); let it see itself instead.
            diagonal = torch.arange(start + T, device=input_ids.device) == (
                start + torch.arange(T, device=input_ids.device)[:, None]
            )
            mask = mask | diagonal
        else:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
            mask = None
            if T > 1 and start > 0:  # a chunk continuing a cache: causal, offset by `start`
                mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(
                    start
                )
        window = self.config.sliding_window
        sliding_mask = mask
        if window is not None and start + T > window:  # the window leaves keys out
            causal = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device)
            causal = causal.tril(start) if mask is None else mask
            sliding_mask = causal & recent_keys(start, T, window, input_ids.device)

        cos, sin = rotary(positions, self.model.norm.weight.dtype)
        x = self.model.embed_tokens(input_ids)
        for layer, slot in self._runs():
            masked = sliding_mask if layer.slides else mask
            x = self._block(layer, x, cos, sin, masked, cache, real=real, slot=slot)
        if cache is not None:
            cache.length += T
        return self._output(x, last_only, head, logits_at)

    def _fused(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        last_only: bool,
        head: bool,
        logits_at: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The forward pass of a few tokens continuing `cache` through the compiled step, or
        None where it does not apply (see `fused_decode_step`)."""
        T = input_ids.shape[1]
        out = None
        if head and logits_at is None:
            out = fused_decode_step(self, input_ids, cache, logits=True, last_only=last_only)
        if out is None:
            x = fused_decode_step(self, input_ids, cache)
            if x is None:
                return None
            out = self._output(x, last_only, head, logits_at)
        cache.length += T
        return out

    def _forward_rows(
        self,
        input_ids: torch.Tensor,
        segments: torch.Tensor | None,
        last_only: bool,
        head: bool,
        logits_at: torch.Tensor | None,
    ) -> torch.Tensor:
        """The forward pass of training rows: no cache, no padding mask; each row one
        sequence, or the examples `segments` numbers.

        A causal model's output at a position reads the positions before it alone, so with
        `logits_at` the columns after the last marked one are cut, and in a model of plain
        attention blocks the per-token layers skip each row's positions after its last marked
        one too (`KeptPositions`): a fine-tuning row's prompt and reply are often followed by
        a quarter of padding, and those layers are most of a training step's arithmetic."""
        kept = None
        if logits_at is not None and not last_only:
            _check_marks(logits_at, input_ids.shape)
            needed = logits_at.flip(-1).cummax(-1).values.flip(-1)  # a mark here or later
            width = max(1, int(needed.any(0).sum()))
            input_ids, needed, logits_at = (t[:, :width] for t in (input_ids, needed, logits_at))
            segments = None if segments is None else segments[:, :width]
            if not bool(needed.all()) and self._plain_attention():
                kept = KeptPositions.of(needed)
        B, T = input_ids.shape
        device = input_ids.device
        index = torch.arange(T, device=device)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        starts = None
        if segments is None:
            positions, mask = index.expand(B, T), None
        else:
            starts = torch.ones_like(segments, dtype=torch.bool)
            starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
            positions = index - torch.where(starts, index, 0).cummax(-1).values
            mask = (causal & (segments[:, :, None] == segments[:, None, :]))[:, None]
        sliding_mask = mask
        window = self.config.sliding_window
        if window is not None and window < T:
            sliding_mask = (causal if mask is None else mask) & recent_keys(0, T, window, device)
        cos, sin = self.model.rotary_emb(positions, self.model.norm.weight.dtype)
        if kept is not None:
            x = self.model.embed_tokens(kept.gather(input_ids))
            logits_at = kept.gather(logits_at)
        else:
            x = self.model.embed_tokens(input_ids)
        for layer, _ in self._runs():
            masked = sliding_mask if layer.slides else mask
            x = self._block(layer, x, cos, sin, masked, None, resets=starts, kept=kept)
        return self._output(x, last_only, head, logits_at)

    def _plain_attention(self) -> bool:
        """Whether every block is plain attention (no Mamba-2 mixer, no latent attention):
        the blocks that take `KeptPositions`."""
        return all(
            type(getattr(layer, "self_attn", None)) is Attention for layer in self.model.layers
        )

    def _block(self, layer: DecoderBlock, x, cos, sin, mask, cache, **options) -> torch.Tensor:
        """`layer` on `x`, recomputed in the backward pass where activations are checkpointed
        (a training pass: no cache). The random state is kept, so the recomputation is exact."""
        training = self.training and cache is None and torch.is_grad_enabled()
        if self.residual_dtype is not None and training:
            x = x.to(self.residual_dtype)  # before the checkpoint, so that it keeps this x
        args = (x, cos, sin, mask, cache)
        if self.activation_checkpointing and training:
            return checkpoint(layer, *args, use_reentrant=False, **options)
        return layer(*args, **options)

    def _output(
        self, x: torch.Tensor, last_only: bool, head: bool, logits_at: torch.Tensor | None
    ) -> torch.Tensor:
        """The last block's output `x` (B, T, hidden), or (N, hidden) at kept positions, normed,
        at the positions asked for, and through the output head unless `head` is False."""
        if last_only:
            x = x[:, -1:]
        if logits_at is not None:
            _check_marks(logits_at, x.shape[:-1])
            x = x[logits_at]
        x = self.model.norm(x)
        return linear(x, self.lm_head) if head else x

    def _runs(self) -> Iterator[tuple[DecoderBlock, int | None]]:
        """Each block as often as it runs (`block_repeats`), with its cache slot (None: the
        block's own layer index, when nothing repeats)."""
        repeats = self.config.block_repeats
        for i, layer in enumerate(self.model.layers):
            for r in range(repeats):
                yield layer, None if repeats == 1 else i * repeats + r

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
