"""Muon (chapter 05): a weight matrix steps along its gradient's momentum, orthogonalised.

AdamW sizes each weight's step by that weight's own gradient history. Muon treats a weight
matrix as the linear map it is: it keeps a momentum of the gradient, replaces it by the nearest
semi-orthogonal matrix (the same singular vectors, every singular value about one) and steps
along that, so the few directions that dominate a gradient do not drown the rest. Five steps of
a Newton–Schulz iteration do the orthogonalising with matmuls alone (Jordan et al., 2024). The
step is scaled to the size an AdamW step would have, 0.2·√max(rows, columns) (Liu et al., 2025,
"Muon is scalable for LLM training"), so one learning rate and one schedule drive both.

Muon is for the blocks' weight matrices. The embedding (and the output head tied to it) and the
norms' gains stay with AdamW, as in every Muon recipe: an embedding row is a lookup, not a map.
`Muon` updates both kinds of group in one optimizer, so checkpoints, resume and the schedule
treat it as they treat AdamW.

PyTorch's `torch.optim.Muon` (the tests' reference) runs the iteration in bf16: fast on GPUs
and on CPUs with AVX-512-BF16 (half fp32's time for a 288×768 matrix), 39 times slower than
fp32 on AVX2-only CPUs (the same matrix, with PyTorch held to its AVX2 paths). This one runs
it in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adam import adam

__all__ = ["COEFFICIENTS", "Muon", "orthogonalize"]

# Jordan's quintic: the steepest slope at zero that still keeps every singular value near one
# after five steps (they land in about [0.7, 1.2], not exactly at 1, which training does not mind).
COEFFICIENTS = (3.4445, -4.7750, 2.0315)
RMS_MATCH = 0.2  # AdamW's update has an RMS of about 0.2 (Liu et al.): Muon's is scaled to it


def orthogonalize(
    matrix: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = COEFFICIENTS,
) -> torch.Tensor:
    """About U·Vᵀ for ``matrix = U·S·Vᵀ``, by `steps` Newton–Schulz iterations in fp32.

    Each step maps X to a·X + b·(X·Xᵀ)·X + c·(X·Xᵀ)²·X, which leaves the singular vectors alone
    and sends every singular value s to a·s + b·s³ + c·s⁵; dividing by the Frobenius norm first
    puts every s in [0, 1], where the polynomial pushes it towards one.
    """
    if matrix.dim() != 2:
        raise ValueError(
            f"orthogonalize takes a matrix, got a tensor of shape {tuple(matrix.shape)}"
        )
    x = matrix.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate with the smaller of the two Gram matrices
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the parameter groups marked ``muon=True`` (matrices), AdamW for the others.

    Muon groups: the momentum buffer is an average of gradients (weight `momentum` on the old
    value), the update is Nesterov's (the gradient pulled towards the buffer), orthogonalised,
    scaled by ``RMS_MATCH·√max(shape)``; weight decay is decoupled, as in AdamW. The other
    groups are AdamW to the bit (PyTorch's functional Adam with decoupled weight decay).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        ns_steps: int = 5,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
            muon=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"] if group["muon"] else ():
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon orthogonalises matrices; a parameter of shape {tuple(p.shape)} "
                        "belongs in a group with muon=False (AdamW)"
                    )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - momentum)
            update = _orthogonalize_whole(p.grad.lerp(buffer, momentum), group["ns_steps"])
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * RMS_MATCH * math.sqrt(max(p.shape)))

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.state[p]:  # AdamW's own state, so its checkpoints read the same
                self.state[p].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p),
                )
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=False,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _orthogonalize_whole(update: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalize` of the whole matrix. Under FSDP each process holds some of its rows (a
    DTensor): gather them, orthogonalise, and keep this process's rows again."""
    if isinstance(update, DTensor):
        whole = orthogonalize(update.full_tensor(), steps)
        return distribute_tensor(whole, update.device_mesh, update.placements)
    return orthogonalize(update, steps)
