"""How far a student's next-token distribution is from its teacher's: the distillation losses.

With p the teacher's distribution and q the student's, both softened by a temperature T
(softmax of logits / T):

* ``forward-kl``: KL(p ‖ q) = Σ p (log p − log q), Hinton et al.'s loss. Where the teacher puts
  mass the student must too: the student covers every mode, spreading itself thin if it must.
* ``reverse-kl``: KL(q ‖ p), MiniLLM's. The student is charged only where it puts mass: it may
  drop modes it cannot fit and keep the ones it can (mode seeking).
* ``jsd``: the generalised Jensen-Shannon divergence of GKD, β KL(p ‖ m) + (1 − β) KL(q ‖ m)
  with m = β p + (1 − β) q. It is finite whatever the two put mass on, and tends to forward KL
  as β → 0 and to reverse KL as β → 1 (scaled by β or 1 − β); TRL's ``generalized_jsd_loss``
  takes the same β.
* ``tv``: the total variation ½ Σ |p − q|, bounded by 1 and symmetric.

`distillation_loss` mixes one of them (times T², so that its gradients keep their size as T
grows, as Hinton et al. do) with the data's cross-entropy, and applies the two models' output
heads a few thousand positions at a time: a 49k-token vocabulary's logits for a whole batch
would not fit in memory, one chunk's do, and the student's are recomputed in the backward pass
instead of kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..data.chat import IGNORE
from ..train import sum_in_chunks

__all__ = ["LOSSES", "distillation_loss", "divergence"]

LOSSES = ("forward-kl", "reverse-kl", "jsd", "tv")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dimension; a zero-probability entry of p adds nothing (0 log 0 = 0),
    as for a teacher kept to its top k tokens."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward-kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """The `loss` (one of `LOSSES`) between the two models' softened next-token distributions
    at every position: logits (..., vocab) in, divergences (...) out, in nats."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits in fp32
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if loss == "forward-kl":
        return _kl(log_p, log_q)
    if loss == "reverse-kl":
        return _kl(log_q, log_p)
    if loss == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if not 0 < beta < 1:
        raise ValueError(f"jsd's beta must lie strictly between 0 and 1, got {beta!r}")
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def distillation_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_hidden: torch.Tensor,
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    loss: str = "forward-kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    chunk: int = 2048,
    autocast: Callable = nullcontext,
) -> tuple[torch.Tensor, int]:
    """The summed loss of every learnt position, and how many there are.

    Each position with a label (not `IGNORE`) costs ``alpha · T² · divergence + (1 − alpha) ·
    cross-entropy(label)``. The hidden states (..., width) are the two models' last normed
    layer (``model(ids, head=False)``); each head maps them to logits, `chunk` positions at a
    time. Only the student's side is differentiated.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    keep = labels.reshape(-1) != IGNORE
    student = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep]
    targets = labels.reshape(-1)[keep]

    def part(hidden: torch.Tensor, teacher_part: torch.Tensor, target: torch.Tensor):
        with autocast():
            logits = student_head(hidden)
            with torch.no_grad():
                teacher_logits = teacher_head(teacher_part)
        total = torch.zeros((), device=hidden.device)
        if alpha > 0:
            soft = divergence(logits, teacher_logits, loss, temperature=temperature, beta=beta)
            total = total + alpha * temperature**2 * soft.sum()
        if alpha < 1:
            hard = F.cross_entropy(logits.float(), target, reduction="sum")
            total = total + (1 - alpha) * hard
        return total

    if not len(targets):
        return torch.zeros((), device=student_hidden.device), 0
    return sum_in_chunks(part, student, teacher, targets, chunk=chunk), len(targets)
