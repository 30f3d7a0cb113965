"""A linear layer stored as two thin factors: y = B (A x) + bias, with A (rank, in), B (out, rank).

An (out, in) weight costs out·in numbers; its rank-r factors cost r·(out + in), fewer when
r < out·in / (out + in), and so do the multiplications. `slmlab.lowrank` decides the factors;
checkpoints record each factored layer's rank under ``low_rank_config`` in config.json, and
`apply_low_rank_config` rebuilds the layers before the tensors are loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.swap import replace_module

__all__ = ["LowRankLinear", "apply_low_rank_config", "low_rank_config"]


class LowRankLinear(nn.Module):
    """``b @ a`` in place of a weight: `a` (rank, in) and `b` (out, rank), and the bias."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"factors must be a (rank, in) and b (out, rank), got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        self.a = nn.Parameter(a.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.in_features, self.out_features = a.shape[1], b.shape[0]

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @classmethod
    def empty(cls, out_features: int, in_features: int, rank: int, bias: bool) -> LowRankLinear:
        """Placeholder factors of the right shapes, for a checkpoint's tensors to fill."""
        return cls(
            torch.empty(rank, in_features),
            torch.empty(out_features, rank),
            torch.empty(out_features) if bias else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a), self.b, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_config(model: nn.Module) -> dict | None:
    """The ``low_rank_config`` section a checkpoint of `model` records (each factored layer's
    rank by name), or None."""
    layers = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return {"layers": layers} if layers else None


def apply_low_rank_config(model: nn.Module, section: dict) -> None:
    """Give `model` the factored layers `section` (from `low_rank_config`) names."""
    for name, rank in section["layers"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"low_rank_config names {name!r}, which is not a linear layer")
        if (
            isinstance(rank, bool)
            or not isinstance(rank, int)
            or not 0 < rank <= min(linear.weight.shape)
        ):
            raise ValueError(
                f"low_rank_config gives {name!r} rank {rank!r}: it must be an integer from 1 "
                f"to {min(linear.weight.shape)}"
            )
        layer = LowRankLinear.empty(
            linear.out_features, linear.in_features, rank, bias=linear.bias is not None
        )
        replace_module(model, name, layer)
