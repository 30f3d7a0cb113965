"""SparseGPT (Frantar & Alistarh, 2023): prune one column at a time, and let the columns not yet
visited absorb the error.

It is GPTQ (`slmlab.quant.gptq`) with "round to the grid" replaced by "set to zero or keep".
For calibration inputs X the loss of a weight row w is ‖X wᵀ − X ŵᵀ‖², with Hessian H = 2 XᵀX;
Optimal Brain Surgeon removes weight q and moves the others to compensate:

    δ = −w_q / [H⁻¹]_qq · H⁻¹[q, :]

Visiting the columns left to right, the same for every row, the H⁻¹ rows each step needs are the
rows of the upper Cholesky factor of H⁻¹, and the updates to the far columns are applied a block
at a time (the lazy batch update). Which weights go is decided per block from the weights as
they are when the block is reached, by OBS's saliency w² / [H⁻¹]_qq²: the share `sparsity` of
the block's weights, or for an N:M pattern the M − N lowest of every M columns of a row.
"""

from __future__ import annotations

import torch

from .masks import check_sparsity, nm_mask, top_mask

__all__ = ["sparsegpt_prune"]


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    *,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned weight (`weight`'s dtype) and its keep-mask, for a (out, in) weight and the
    (in, in) Hessian 2 XᵀX of its calibration inputs. Computes in the Hessian's dtype.

    `pattern` (N, M) keeps N of every M consecutive inputs and overrides `sparsity`. `damp` adds
    that fraction of the mean diagonal to the diagonal, as GPTQ does; inputs never seen (zero
    diagonal) lose their weights.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"the Hessian must be ({cols}, {cols}) for a weight of {cols} inputs, "
            f"got {tuple(hessian.shape)}"
        )
    if pattern is None:
        check_sparsity(sparsity)
    else:
        n, m = pattern
        if cols % m:
            raise ValueError(
                f"an {n}:{m} pattern needs rows whose width is a multiple of {m}; this layer "
                f"has {cols} inputs: choose an M that divides it"
            )
        block_size = max(m, block_size // m * m)  # a block holds whole groups of M
    dtype = hessian.dtype
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    keep = torch.ones(rows, cols, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W_block = W[:, start:end].clone()
        H_inv_block = H_inv[start:end, start:end]
        diagonal = H_inv_block.diagonal()
        errors = torch.zeros_like(W_block)
        keep_block = torch.ones_like(W_block, dtype=torch.bool)
        if pattern is None:
            keep_block = top_mask(W_block**2 / diagonal[None, :] ** 2, sparsity, per="layer")
        for i in range(end - start):
            if pattern is not None and i % m == 0:
                saliency = W_block[:, i : i + m] ** 2 / diagonal[None, i : i + m] ** 2
                keep_block[:, i : i + m] = nm_mask(saliency, n, m)
            w = W_block[:, i]
            kept = torch.where(keep_block[:, i], w, 0.0)
            error = (w - kept) / H_inv_block[i, i]
            W_block[:, i:] -= error[:, None] * H_inv_block[i, i:][None, :]
            W_block[:, i] = kept  # what the update leaves there, without its rounding error
            errors[:, i] = error
        W[:, start:end] = W_block
        W[:, end:] -= errors @ H_inv[start:end, end:]  # the lazy update of the far columns
        keep[:, start:end] = keep_block
    return W.to(weight.dtype), keep
