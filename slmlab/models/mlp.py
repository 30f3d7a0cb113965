"""The MLP of a block: a SwiGLU, or a mixture of SwiGLU experts of which a router picks `k` of
`E` for each token, the token's output being theirs weighted by the router's probabilities.

Module names are transformers' (Qwen2-MoE, Qwen3-MoE, OLMoE, and Mixtral's on renaming:
`slmlab.checkpoint`): the router is ``mlp.gate`` (a linear layer, d -> E), expert e is
``mlp.experts.e`` (a SwiGLU: ``gate_proj``, ``up_proj``, ``down_proj``), Qwen2-MoE's shared
expert is ``mlp.shared_expert``, scaled by sigmoid(``mlp.shared_expert_gate``). The experts
being plain linear layers, every transform of the book (quantization, LoRA, pruning) reaches
them by their names, and leaves the router alone.

Only k of the E experts run for a token, so a token costs the FLOPs of k experts while the
model holds all E: the *active* parameters (`slmlab.models.param_count`) are what compute
pays for, the total is what memory pays for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import linear, linear_many
from .config import ModelConfig

__all__ = ["SparseMoE", "SwiGLU", "load_balancing_loss", "router_loss", "top_k_routing"]


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)): the gated MLP of Llama-family models, `intermediate_size`
    wide (default the config's)."""

    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_many(x, [self.gate_proj, self.up_proj])
        return linear(F.silu(gate) * up, self.down_proj)


class SparseMoE(nn.Module):
    """A mixture of `num_experts` SwiGLU experts, `num_experts_per_tok` of them per token, and
    a shared expert every token goes through when the config has one (Qwen2-MoE).

    The router's logits of the last forward stay in `router_logits` (tokens, E), for the
    training loop's load-balancing loss (`load_balancing_loss`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_coef = config.router_aux_loss_coef
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(config, config.expert_size) for _ in range(config.num_experts)
        )
        shared = config.shared_expert_intermediate_size
        self.shared_expert = SwiGLU(config, shared) if shared else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared else None
        self.router_logits: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens x (N, d): the router's logits (N, E), the chosen experts (N, k) and their
        weights (N, k) (`top_k_routing`)."""
        logits = self.gate(x)
        experts, weights = top_k_routing(logits, self.top_k, self.norm_topk_prob)
        return logits, experts, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, experts, weights = self.route(x)
        self.router_logits = logits
        out = torch.zeros_like(x)
        # Expert by expert: its tokens gathered, run through it at once, added back weighted.
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            y = self.experts[e](x[token])
            out.index_add_(0, token, y * weights[token, slot, None])
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def top_k_routing(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts (N, k) each token goes to and their weights (N, k), largest first: a softmax
    of the router's logits (N, E) over all E experts, in fp32, and the k largest probabilities,
    rescaled to sum to 1 when `normalize` (Mixtral) or left as they are (Qwen2-MoE)."""
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as Mixtral trains with it: E · Σ_e Σ_i f_ie · P_e
    over the tokens of every MoE layer, where f_ie is the share of tokens whose i-th choice is
    expert e and P_e the mean router probability of e. Routing that spreads the tokens evenly
    gives k; every token sent to the same expert with certainty gives E. Its gradient reaches
    the router through P_e (f counts, and has none)."""
    logits = torch.cat(router_logits, dim=0)  # (tokens · layers, E)
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
    share = F.one_hot(chosen, num_experts).float().mean(dim=0)  # (k, E)
    return num_experts * (share * probs.mean(dim=0)).sum()


def router_loss(model: nn.Module) -> torch.Tensor | None:
    """The load-balancing loss of `model`'s last forward over all its MoE layers, weighted by
    the config's ``router_aux_loss_coef``: what training adds to the language-model loss. None
    for a model without experts."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    logits = [m.router_logits for m in layers if m.router_logits is not None]
    if not logits:
        return None
    return layers[0].aux_loss_coef * load_balancing_loss(logits, layers[0].top_k)
