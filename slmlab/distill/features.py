"""Hidden-state distillation through a learnt projection (FitNets, Romero et al., 2015;
TinyBERT, Jiao et al., 2020): the student's residual stream after one block is mapped by a
matrix W (student width → teacher width, trained with the student) onto the teacher's after one
of its blocks, and the student is charged the squared distance.

W is what lets two widths meet: a student of width 128 has no coordinate that means what a
teacher's channel 200 means, and W learns the correspondence. It is part of the objective, not
of the student: it trains under the run's optimizer, is saved with the run for exact resume and
is left out of the student's checkpoint.

The distance at each position is relative, ‖W h_s − h_t‖² / ‖h_t‖²: the residual stream's size
differs between models and grows with depth, and a relative error keeps the weight of the term
(`distill.features`) meaningful for any pair (1 is what predicting zeros costs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["block_output", "feature_loss", "feature_projection"]


def feature_projection(student_width: int, teacher_width: int, seed: int) -> torch.nn.Linear:
    """The learnt map W from the student's width to the teacher's, without a bias, drawn from
    N(0, 1/student_width) by a generator seeded with `seed` (so that the same recipe makes the
    same W)."""
    projection = torch.nn.Linear(student_width, teacher_width, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        projection.weight.copy_(
            torch.randn(teacher_width, student_width, generator=generator) / student_width**0.5
        )
    return projection


def feature_loss(
    teacher: torch.Tensor, student: torch.Tensor, projection: torch.nn.Module
) -> torch.Tensor:
    """Σ over the positions of ‖W h_s − h_t‖² / ‖h_t‖², with `student` h_s (B, T, student width),
    `teacher` h_t (B, T, teacher width) and W the `projection`. A sum over positions, so that it
    adds to a loss summed over the learnt tokens."""
    weight = next(projection.parameters())
    mapped = projection(student.to(weight.dtype))
    wide = torch.promote_types(mapped.dtype, torch.float32)  # bf16 under autocast: sum in fp32
    mapped, target = mapped.to(wide), teacher.to(wide)
    error = (mapped - target).square().sum(-1)
    return (error / target.square().sum(-1).clamp_min(1e-12)).sum()


@contextmanager
def block_output(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """The residual stream leaving block `layer` (−1: the last) in the model's forward pass
    inside the ``with`` block (the last run of a block that repeats): in the list this yields,
    once the block ends."""
    blocks = model.model.layers
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(
            f"distill.feature_layers names block {layer}, which does not exist: the model has "
            f"{len(blocks)} blocks (0 … {len(blocks) - 1}, or −1 for the last)"
        )
    seen: list[torch.Tensor] = []
    hook = blocks[layer].register_forward_hook(lambda module, args, out: seen.append(out))
    outputs: list[torch.Tensor] = []
    try:
        yield outputs
    finally:
        hook.remove()
    outputs.extend(seen[-1:])
