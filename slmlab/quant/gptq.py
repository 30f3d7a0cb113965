"""GPTQ (Frantar et al., 2022): round one column at a time, and let the columns not yet rounded
absorb the error.

Quantizing a layer should keep its *outputs*, not its weights: for calibration inputs X (one
row per token), the loss of a weight row w is ‖X wᵀ − X ŵᵀ‖², a quadratic with Hessian
H = 2 XᵀX, the same for every row. Optimal Brain Surgeon says how to round one weight q and
move the others to compensate:

    δ = −(w_q − ŵ_q) / [H⁻¹]_qq · H⁻¹[q, :]

after which q is fixed and H⁻¹ loses its row and column. GPTQ's three observations make this
cheap enough for any layer: (1) round the columns in one fixed order, the same for all rows,
so H⁻¹ is updated once per column, not once per weight; (2) the successive H⁻¹ rows needed are
exactly the rows of the upper Cholesky factor of H⁻¹, computed once; (3) apply the updates to
the far columns lazily, a block of columns at a time, as one matrix product.

*Act-order* rounds the columns with the largest Hessian diagonal (the most active inputs)
first, while there are still many columns left to absorb their error. With groups, the grid
(scale and zero) of each group is then fixed before any update ("static groups"), because the
groups are stored in the original column order; without act-order each group's grid is taken
from the already-updated weights when its first column is reached, as in the paper.
"""

from __future__ import annotations

import torch

from ..layers.formats import QuantizedTensor, _check, int_codes, int_grid

__all__ = ["gptq_quantize", "layer_error"]


def layer_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's objective: tr((W − Ŵ) H (W − Ŵ)ᵀ), the summed squared output error over the
    calibration inputs (H = 2 XᵀX)."""
    delta = (weight - approx).detach().to(hessian.dtype)  # a number, not part of a graph
    return float(torch.einsum("ri,ij,rj->", delta, hessian, delta))


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    act_order: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
) -> QuantizedTensor:
    """Quantize a (out, in) weight to `bits`-bit integers with GPTQ, given the (in, in) Hessian
    2 XᵀX of its calibration inputs. Computes in the Hessian's dtype (float64 in the tests).

    `damp` adds that fraction of the mean diagonal to the diagonal, so H is invertible even when
    some inputs are always zero or collinear; inputs never seen (zero diagonal) get weight 0.
    """
    group = _check(weight, "int", bits, group_size)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"the Hessian must be ({cols}, {cols}) for a weight of {cols} inputs, "
            f"got {tuple(hessian.shape)}"
        )
    dtype = hessian.dtype
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = cols // group
    scales = torch.empty(rows, n_groups, dtype=dtype)
    zeros = torch.empty(rows, n_groups, dtype=dtype)
    order = torch.arange(cols)
    if act_order:
        scales, zeros = int_grid(W.reshape(rows, n_groups, group), bits, symmetric)
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(damp * H.diagonal().mean())
    # The rows of H⁻¹ that each step needs, restricted to the columns still free, are the rows
    # of the upper Cholesky factor of H⁻¹ (scaled): one factorisation instead of one per column.
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # A group's grid is read from the weights when its first column comes: the whole group must
    # be in the current block then, so blocks are whole numbers of groups.
    block = max(group, block_size // group * group) if not act_order else block_size
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        W_block = W[:, start:end].clone()
        errors = torch.zeros_like(W_block)
        H_inv_block = H_inv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not act_order and column % group == 0:
                scales[:, g], zeros[:, g] = int_grid(W_block[:, i : i + group], bits, symmetric)
            w = W_block[:, i]
            q = int_codes(w, scales[:, g], zeros[:, g], bits, symmetric)
            codes[:, column] = q
            error = (w - scales[:, g] * (q.to(dtype) - zeros[:, g])) / H_inv_block[i, i]
            W_block[:, i:] -= error[:, None] * H_inv_block[i, i:][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ H_inv[start:end, end:]  # the lazy update of the far columns
    return QuantizedTensor(
        codes,
        scales.float(),
        None if symmetric else zeros.to(torch.uint8),
        "int",
        bits,
        group,
    )
