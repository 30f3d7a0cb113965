"""A linear layer whose weight is 2:4 sparse, stored packed: half the values, 2-bit positions.

In every group of four consecutive inputs of a row at most two weights are nonzero (the N:M
pattern `slmlab.prune` makes with ``pattern="2:4"``). The layer keeps, per row, the two values
of each group, (out, in/2), and their positions in the group, 2 bits each and four to a byte,
(out, in/8): byte j covers inputs 8j..8j+7, its bits 2t..2t+1 place value 4j+t in group
2j + t/2. That is 2.125 bytes a weight against fp32's 4, and decoding one token, which reads
every weight once, is bound by those bytes: `slmlab.kernels.sparse24_linear` multiplies without
unpacking. Elsewhere (many rows, autograd, another device) the weight is unpacked and
multiplied; the values are a parameter, so a fine-tune of the packed model keeps the pattern.

Checkpoints record the packed layers under ``sparse_config`` in config.json;
`apply_sparse_config` rebuilds them before the tensors are loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..models.swap import replace_module

__all__ = [
    "Sparse24Linear",
    "apply_sparse_config",
    "is_2to4",
    "pack_2to4",
    "sparse_config",
    "unpack_2to4",
]

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of four consecutive inputs of every row holds at most two nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 8:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def pack_2to4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), positions (out, in/8) uint8) of a 2:4-sparse `weight` (out, in).

    A group with fewer than two nonzeros stores zeros at its first free positions, so every
    group has two distinct positions, ascending."""
    if weight.dim() != 2 or weight.shape[1] % 8:
        raise ValueError(
            f"a 2:4 weight must be 2-D with a multiple of 8 inputs, got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, -1, 4)
    nonzero = groups != 0
    if bool((nonzero.sum(-1) > 2).any()):
        raise ValueError(
            "the weight is not 2:4 sparse (a group of four inputs holds more than two "
            "nonzeros): prune it first with PruneConfig(pattern='2:4')"
        )
    # Nonzeros first, in order, then the zeros: a stable sort of "is zero" per group.
    order = torch.sort((~nonzero).to(torch.uint8), dim=-1, stable=True).indices[..., :2]
    positions = order.sort(dim=-1).values  # (out, in/4, 2), ascending
    values = groups.gather(-1, positions).reshape(out_features, in_features // 2)
    codes = positions.reshape(out_features, in_features // 8, 4).to(torch.uint8)
    packed = (codes << _SHIFTS.to(codes.device)).sum(-1, dtype=torch.uint8)
    return values.contiguous(), packed.contiguous()


def unpack_2to4(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight that `pack_2to4` packed (differentiable in `values`)."""
    out_features, half = values.shape
    codes = (positions[..., None] >> _SHIFTS.to(positions.device)) & 3  # (out, in/8, 4)
    group_start = torch.arange(half, device=values.device) // 2 * 4
    columns = codes.reshape(out_features, half).long() + group_start
    dense = values.new_zeros(out_features, 2 * half)
    return dense.scatter(1, columns, values)


class Sparse24Linear(nn.Module):
    """A linear layer holding a 2:4-sparse weight packed (`pack_2to4`), and its bias."""

    def __init__(
        self, values: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if (
            values.dim() != 2
            or positions.dtype != torch.uint8
            or positions.shape != (values.shape[0], values.shape[1] // 4)
            or values.shape[1] % 4
        ):
            raise ValueError(
                f"2:4 values must be (out, in/2) with uint8 positions (out, in/8), got "
                f"{tuple(values.shape)} and {positions.dtype} {tuple(positions.shape)}"
            )
        self.values = nn.Parameter(values.detach().clone())
        self.register_buffer("positions", positions.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features = values.shape[0], 2 * values.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        """The packed form of a linear layer whose weight is 2:4 sparse."""
        return cls(*pack_2to4(linear.weight.detach()), linear.bias)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool) -> Sparse24Linear:
        """Placeholder tensors of the right shapes, for a checkpoint's tensors to fill."""
        return cls(
            torch.empty(out_features, in_features // 2),
            torch.empty(out_features, in_features // 8, dtype=torch.uint8),
            torch.empty(out_features) if bias else None,
        )

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight, zeros included."""
        return unpack_2to4(self.values, self.positions)

    def sparse24_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The packed tensors, for the fused decode step (`slmlab.kernels`), where it takes them."""
        if self.values.dtype is torch.float32 and self.in_features % 8 == 0:
            return self.values, self.positions
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.sparse24_linear(x, self.values, self.positions)
        if y is not None:
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern=2:4"


def sparse_config(model: nn.Module) -> dict | None:
    """The ``sparse_config`` section a checkpoint of `model` records (each packed layer's
    pattern by name), or None."""
    layers = {n: "2:4" for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    return {"layers": layers} if layers else None


def apply_sparse_config(model: nn.Module, section: dict) -> None:
    """Give `model` the packed layers `section` (from `sparse_config`) names."""
    for name, pattern in section["layers"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"sparse_config names {name!r}, which is not a linear layer")
        if pattern != "2:4" or linear.in_features % 8:
            raise ValueError(
                f"sparse_config gives {name!r} pattern {pattern!r}: only '2:4' is stored "
                "packed, for layers with a multiple of 8 inputs"
            )
        layer = Sparse24Linear.empty(
            linear.out_features, linear.in_features, bias=linear.bias is not None
        )
        replace_module(model, name, layer)
