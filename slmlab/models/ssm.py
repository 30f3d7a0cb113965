"""Mamba-2: a selective state-space layer, the linear-time alternative to attention.

Attention keeps every past key and value and reads all of them for each new token: its cache
grows with the context. A state-space layer keeps a fixed-size state instead, a matrix per head
that each token decays and adds to (Gu & Dao, 2024, "Transformers are SSMs"):

    state_t = exp(dt_t · A) · state_{t-1} + dt_t · x_t ⊗ B_t        (head_dim × d_state)
    y_t     = state_t · C_t + D · x_t

``x`` is the head's input, ``B`` and ``C`` play the parts of a key and a query, ``dt`` (a
time step, from the input) says how much this token writes and how fast the past fades, and
``A < 0`` sets the speed of fading per head. Unrolled, ``y_i = Σ_{j≤i} (C_i·B_j) ·
exp(Σ_{j<s≤i} dt_s A) · dt_j x_j``: causal attention without the softmax, whose weights decay
with distance. That is the parallel form training uses (`ssd_chunked`: within a chunk of
tokens as attention, from chunk to chunk through the state, so the cost stays linear in the
length); decoding uses the recurrent form (`ssd_step`), one fixed-size update per token.

The layer around it follows Mamba-2 as transformers' Bamba writes it (`Mamba2Mixer`): one input
projection to the gate ``z``, the inputs ``x``, ``B``, ``C`` and the time steps; a short causal
convolution over ``x``, ``B`` and ``C``; the scan; a norm gated by ``z``; an output projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear
from .config import ModelConfig

if TYPE_CHECKING:
    from .decoder import KVCache

__all__ = ["GatedRMSNorm", "Mamba2Mixer", "causal_conv", "segment_sum", "ssd_chunked", "ssd_step"]


def segment_sum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) → (..., T, T): entry [i, j] is a_{j+1} + … + a_i for j ≤ i, −inf above the
    diagonal. The log of the decay from token j to token i, summed directly rather than as a
    difference of two cumulative sums, which would lose precision (and give inf − inf where a
    decay is −inf, the start of a packed example)."""
    T = a.shape[-1]
    terms = a[..., :, None].expand(*a.shape, T)  # [s, j] = a_s
    after = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # s > j
    sums = terms.masked_fill(~after, 0.0).cumsum(dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    state: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan in its parallel form, `chunk_size` tokens at a time: (y, final state).

    x (b, T, h, p), dt (b, T, h) after softplus, A (h,) negative, B and C (b, T, h, n) (each
    group's maps already repeated for its heads), state (b, h, p, n) or None for zeros.
    `resets` (b, T) is True at the first token of each example packed into a row: nothing
    before it reaches it (its decay is exp(−inf) = 0). Without the D term. All in fp32.

    Within each chunk the output is attention's product with the decaying weights; across
    chunks only the state travels, one small update per chunk, so the cost is linear in T.
    """
    b, T, h, p = x.shape
    n = B.shape[-1]
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    log_decay = dt * A.float()  # (b, T, h), ≤ 0
    if resets is not None:
        log_decay = log_decay.masked_fill(resets[..., None], float("-inf"))
    written = x * dt[..., None]  # what each token writes: dt · x
    # Pad to whole chunks with tokens that write nothing and let the state through (decay 1).
    pad = -T % chunk_size
    if pad:
        written, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (written, B, C))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
    chunks = (T + pad) // chunk_size
    written, B, C = (t.unflatten(1, (chunks, chunk_size)) for t in (written, B, C))
    a = log_decay.unflatten(1, (chunks, chunk_size)).permute(0, 3, 1, 2)  # (b, h, c, l)
    decay = segment_sum(a).exp()  # (b, h, c, l, l): from token j to token i of a chunk
    scores = torch.einsum("bcihn,bcjhn->bhcij", C, B)  # C_i · B_j
    within = torch.einsum("bhcij,bcjhp->bcihp", scores * decay, written)
    # Each chunk's own contribution to the state at its end, then the state entering each.
    to_end = decay[..., -1, :].permute(0, 2, 3, 1)  # (b, c, l, h): from token j to the end
    added = torch.einsum("bcjhp,bcjhn->bchpn", written * to_end[..., None], B)
    since_start = a.cumsum(-1)  # (b, h, c, l): log decay from a chunk's start to token i
    through = since_start[..., -1].exp()  # (b, h, c): across a whole chunk
    if state is None:
        state = x.new_zeros(b, h, p, n)
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = state * through[:, :, c, None, None] + added[:, c]
    before = torch.stack(entering, dim=1)  # (b, c, h, p, n)
    from_before = torch.einsum("bcihn,bchpn->bcihp", C, before)
    y = within + from_before * since_start.exp().permute(0, 2, 3, 1)[..., None]
    return y.flatten(1, 2)[:, :T], state


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrent form, one token: x (b, h, p), dt (b, h), B and C (b, h, n), state (b, h,
    p, n) → (y (b, h, p), the new state). Without the D term."""
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    decay = (dt * A.float()).exp()  # (b, h)
    state = state * decay[..., None, None] + (x * dt[..., None])[..., None] * B[:, :, None]
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    past: torch.Tensor | None = None,
    resets: torch.Tensor | None = None,
) -> torch.Tensor:
    """A depthwise convolution that reads each channel's last K inputs (itself included).

    x (b, T, c); weight (c, 1, K) as `nn.Conv1d` stores it; `past` (b, K−1, c), the inputs
    before x (zeros at the start of a text); `resets` (b, T) as in `ssd_chunked`: a tap that
    would reach across the start of an example reads zero."""
    K = weight.shape[-1]
    b, T, c = x.shape
    if past is None:
        past = x.new_zeros(b, K - 1, c)
    inputs = torch.cat((past.to(x.dtype), x), dim=1)  # (b, K − 1 + T, c)
    if resets is not None:
        # Tap k reads position t − (K − 1 − k); valid when no example starts after it, up to t.
        starts = resets.long().cumsum(-1)
        starts_before = torch.cat((starts.new_zeros(b, K - 1), starts), dim=1)
    out = x.new_zeros(b, T, c) if bias is None else bias.expand(b, T, c).clone()
    for k in range(K):
        tap = inputs[:, k : k + T] * weight[:, 0, k]
        if resets is not None:
            tap = tap * (starts_before[:, k : k + T] == starts)[..., None]
        out = out + tap
    return out


class GatedRMSNorm(nn.Module):
    """RMSNorm of y · silu(z), over groups of channels (Mamba-2's output norm), in fp32."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = F.rms_norm(groups, (self.group_size,), eps=self.eps).flatten(-2)
        return self.weight * normed.to(y.dtype)


class Mamba2Mixer(nn.Module):
    """A Mamba-2 layer where a block would have attention (a ``"linear_attention"`` layer).

    Parameter names are transformers' (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``,
    ``norm``, ``out_proj``), so Bamba's checkpoints load as they are.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.mamba_n_heads
        self.head_dim = config.mamba_d_head
        self.state_size = config.mamba_d_state
        self.num_groups = config.mamba_n_groups
        self.chunk_size = config.mamba_chunk_size
        self.inner = config.mamba_intermediate_size
        self.conv_dim = self.conv_channels(config)
        bias = config.mamba_proj_bias
        d = config.hidden_size
        self.in_proj = nn.Linear(d, self.inner + self.conv_dim + self.num_heads, bias=bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.mamba_d_conv,
            groups=self.conv_dim,
            bias=config.mamba_conv_bias,
        )
        # Mamba's initialisation: head i fades at rate i (A = −i), time steps start near 1.3.
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.arange(1, self.num_heads + 1, dtype=torch.float32).log())
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.inner, self.inner // self.num_groups, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.inner, d, bias=bias)

    @staticmethod
    def conv_channels(config: ModelConfig) -> int:
        """The convolution's channels: x, B and C side by side."""
        return config.mamba_intermediate_size + 2 * config.mamba_n_groups * config.mamba_d_state

    def forward(
        self,
        hidden: torch.Tensor,
        real: torch.Tensor | None = None,
        resets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden (b, T, d) → (b, T, d). `real` (b, T) is False at padding, which then writes
        nothing; `resets` as in `ssd_chunked`; with a `cache`, the tokens continue its state."""
        T = hidden.shape[1]
        z, xbc, dt = linear(hidden, self.in_proj).split(
            [self.inner, self.conv_dim, self.num_heads], dim=-1
        )
        if real is not None:
            xbc = xbc * real[..., None]
        past = cache.conv_states[self.layer_index] if cache is not None else None
        conv_bias = self.conv1d.bias
        convolved = causal_conv(xbc, self.conv1d.weight, conv_bias, past, resets)
        if cache is not None:
            kept = torch.cat((past.to(xbc.dtype), xbc), dim=1)[:, -past.shape[1] :]
            past.copy_(kept)
        xbc = F.silu(convolved)
        if real is not None:
            xbc = xbc * real[..., None]
        x, B, C = xbc.split(
            [self.inner, self.num_groups * self.state_size, self.num_groups * self.state_size],
            dim=-1,
        )
        heads_per_group = self.num_heads // self.num_groups
        x = x.unflatten(-1, (self.num_heads, self.head_dim))
        B = B.unflatten(-1, (self.num_groups, self.state_size)).repeat_interleave(
            heads_per_group, dim=2
        )
        C = C.unflatten(-1, (self.num_groups, self.state_size)).repeat_interleave(
            heads_per_group, dim=2
        )
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -self.A_log.float().exp()
        state = cache.ssm_states[self.layer_index] if cache is not None else None
        if state is not None and T == 1:
            y, new_state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state)
            y = y[:, None]
        else:
            y, new_state = ssd_chunked(
                x, dt, A, B, C, chunk_size=self.chunk_size, state=state, resets=resets
            )
        if state is not None:
            state.copy_(new_state)
        y = y + x.float() * self.D.float()[:, None]
        y = self.norm(y.flatten(-2).to(hidden.dtype), z)
        return linear(y, self.out_proj)
