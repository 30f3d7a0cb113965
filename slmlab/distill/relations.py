"""Self-attention relation transfer (MiniLMv2, Wang et al., 2021): the student learns how the
teacher's tokens relate to each other inside one attention layer, not only what it predicts.

In a layer, each token's query vector q_i scores every earlier token's q_j; the softmax of those
scores over j is the token's *query relation*, a distribution over the context. The same is
taken for the keys and for the values. A relation is T × T whatever the layer's width, and
the projection's width is split into a fixed number of *relation heads* that need not be the
attention's heads: a teacher of 9 heads and a student of 4, of widths 288 and 128, compare as 4
relation heads each. So the two models may differ in width, heads and key/value groups, with no
projection to learn. The student is charged KL(teacher ‖ student) for each query's relation
rows, averaged over the three relations and the relation heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = ["attention_inputs", "relation_loss", "relations"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def relations(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The log relation distributions (B, heads, T, T) of a projection's outputs `x` (B, T,
    width): `x` split into `heads` relation heads of width d, and for each query i the log
    softmax over j ≤ i of x_i · x_j / √d (a later j gets log 0 = −inf)."""
    B, T, width = x.shape
    if width % heads:
        raise ValueError(
            f"relation_heads = {heads} does not divide a projection of width {width}: choose a "
            "divisor of every width taken, the teacher's and the student's, queries and keys"
        )
    d = width // heads
    x = x.float().view(B, T, heads, d).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return F.log_softmax(scores.masked_fill(~causal, -math.inf), dim=-1)


def relation_loss(
    teacher: tuple[torch.Tensor, ...], student: tuple[torch.Tensor, ...], heads: int
) -> torch.Tensor:
    """Σ over the rows' positions of KL(teacher ‖ student) between the two models' relations,
    each position's averaged over the relations given (queries, keys, values) and the `heads`.
    A sum over positions, so that it adds to a loss summed over the learnt tokens."""
    total = torch.zeros((), device=student[0].device)
    for t, s in zip(teacher, student, strict=True):
        log_p, log_q = relations(t, heads), relations(s, heads)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # (B, heads, T)
        total = total + kl.mean(1).sum()
    return total / len(teacher)


@contextmanager
def attention_inputs(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """The outputs of block `layer`'s query, key and value projections in the model's forward
    passes inside the ``with`` block (the last run of a block that repeats): in the list this
    yields, in that order, once the block ends."""
    blocks = model.model.layers
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(
            f"relation layer {layer} does not exist: the model has {len(blocks)} blocks "
            f"(0 … {len(blocks) - 1}, or −1 for the last)"
        )
    attention = getattr(blocks[layer], "self_attn", None)
    if attention is None or not all(hasattr(attention, name) for name in PROJECTIONS):
        raise ValueError(
            f"block {layer} has no query, key and value projections to relate (a state-space "
            "or latent-attention block): choose another relation layer"
        )
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(attention, name).register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, out)
        )
        for name in PROJECTIONS
    ]
    outputs: list[torch.Tensor] = []
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()
    outputs.extend(seen[name] for name in PROJECTIONS if name in seen)
