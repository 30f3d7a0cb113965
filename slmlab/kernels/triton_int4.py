"""The weight-only int4 linear layer for CUDA GPUs, in Triton.

The same contract as the CPU kernel (`slmlab.kernels.int4_linear`): ``y = x @ W.T`` with
W = scales · (codes − zeros) per group of `group_size` inputs, the codes packed two to a byte
(the even input in the low nibble), never materialised in full. Each program computes one
(BLOCK_M × BLOCK_N) tile of y: it streams BLOCK_K columns of x and the matching packed bytes,
unpacks the nibbles and applies the group's scale in registers, and accumulates
``x_tile @ w_tileᵀ`` in fp32 on the tensor cores (in x's dtype: fp16 or bf16; fp32 inputs are
multiplied in full fp32, not TF32, so that the result equals dequantize-then-matmul).

Importing this module needs `triton` (``pip install 'slmlab[gpu]'``). Under
``TRITON_INTERPRET=1`` Triton runs the kernel on CPU tensors with NumPy, which is how the tests
check it on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["int4_linear"]


@triton.jit
def _int4_linear_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    y_ptr,
    M,
    N,
    K,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # of x and y
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W, columns of y
    row_ok = rows[:, None] < M
    out_ok = outs[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k[None, :] < K
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok & k_ok, other=0.0)
        # Input k's code is in byte k // 2, low nibble for even k: a byte is read for both of
        # its nibbles (the second read hits the cache), and the shift picks the half.
        byte = tl.load(
            codes_ptr + outs[:, None] * (K // 2) + k[None, :] // 2, mask=out_ok & k_ok, other=0
        )
        code = (byte.to(tl.int32) >> ((k[None, :] % 2) * 4)) & 0xF
        group = outs[:, None] * (K // GROUP) + k[None, :] // GROUP
        scale = tl.load(scales_ptr + group, mask=out_ok & k_ok, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group, mask=out_ok & k_ok, other=0).to(tl.int32)
        else:
            zero = 8  # symmetric codes are stored offset by 2^(bits−1)
        w = ((code - zero).to(tl.float32) * scale).to(x.dtype)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    tl.store(
        y_ptr + rows[:, None] * N + outs[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok & (outs[None, :] < N),
    )


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ W.T`` in x's dtype for the packed 4-bit weight (see the module's docstring)."""
    out_features, in_features = codes.shape[0], codes.shape[1] * 2
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the packed weight {in_features}")
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    # Tensor-core tiles are at least 16 on a side: decoding (a few rows) pads M to 16 and
    # takes wider tiles of W, whose bytes are what the time goes on.
    block_m = 16 if rows <= 16 else 64
    block_n = 128 if rows <= 16 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _int4_linear_kernel[grid](
        x2,
        codes.contiguous(),
        scales.float().contiguous(),
        zeros.contiguous() if zeros is not None else codes,  # unread without zeros
        y,
        rows,
        out_features,
        in_features,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64,
    )
    return y.view(*x.shape[:-1], out_features)
