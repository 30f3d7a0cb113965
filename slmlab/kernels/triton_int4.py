"""The weight-only int4 linear layer for CUDA GPUs, in Triton.

The same contract as the CPU kernel (`slmlab.kernels.int4_linear`): ``y = x @ W.T`` with
W = scales · (codes − zeros) per group of `group_size` inputs, the codes packed two to a byte
(the even input in the low nibble). Two paths, chosen by the number of rows of x:

* Up to `FUSED_MAX_ROWS` (decoding, small batches) the weight is never materialised. Each
  program computes one (BLOCK_M × BLOCK_N) tile of y, or one part of its sum over the inputs:
  it reads a (BLOCK_N × BLOCK_K/2) tile of packed bytes once, splits each byte into its two
  nibbles, interleaves them back into input order and multiplies on the tensor cores. Where one
  group spans the tile (`group_size` a multiple of BLOCK_K) the tile is multiplied as small
  integers (codes − zero, exact in fp16 and bf16) and the group's scale is applied to the
  product, once per output instead of once per weight. Accumulation is fp32; fp32 inputs are
  multiplied in full fp32, not TF32, so that the result equals dequantize-then-matmul.
  A batch-1 product reads each byte of the weight once and does almost no arithmetic, so its
  speed is the number of bytes in flight: the sum over the inputs is split over several
  programs (split-K) whose fp32 parts a second small kernel adds in a fixed order, so the
  result does not depend on scheduling.
* More rows (prefill, training-sized batches) are compute-bound, where cuBLAS's GEMM is far
  ahead of a Triton GEMM that unpacks as it goes: one kernel dequantizes the weight to x's
  dtype (a read of the codes and one write, as 32-bit words holding two 16-bit weights) and
  cuBLAS multiplies.

Tile sizes and the crossover were measured on an H100 by ``python -m benchmarks.quant_speed_cuda
--sweep`` (results in benchmarks/results/quant_speed_cuda.json).

Importing this module needs `triton` (``pip install 'slmlab[gpu]'``). Under
``TRITON_INTERPRET=1`` Triton runs the kernels on CPU tensors with NumPy, which is how the
tests check them on machines without a GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["FUSED_MAX_ROWS", "LaunchConfig", "dequantize_int4", "int4_linear", "launch_config"]

# Up to this many rows of x the fused kernel runs; more rows dequantize, then cuBLAS. On an H100,
# 4096² fp16, per layer: 64 rows fused 20.7 µs, dequantized 26.5 µs; 256 rows 57.8 against
# 33.4 µs (``python -m benchmarks.quant_speed_cuda``, the two forced paths' rows).
FUSED_MAX_ROWS = 64

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _int4_linear_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    y_ptr,  # (SPLIT_K, M, N): one slice per part of the inputs
    M,
    N,
    K: tl.constexpr,  # a layer's width: one compilation per width, and a static loop
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # of x and y
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W, columns of y
    part = tl.program_id(2)
    row_ok = rows[:, None] < M
    out_ok = outs < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for first in range(0, K, BLOCK_K * SPLIT_K):
        start = first + part * BLOCK_K  # this part's tile (past K for the last parts: masked)
        k = start + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok & k_ok[None, :], other=0.0)
        byte_at = start // 2 + tl.arange(0, BLOCK_K // 2)  # byte b holds inputs 2b and 2b + 1
        byte = tl.load(
            codes_ptr + outs[:, None] * (K // 2) + byte_at[None, :],
            mask=out_ok[:, None] & (byte_at[None, :] < K // 2),
            other=0,
        ).to(tl.int32)
        # Low nibble, high nibble, low, high, ...: the inputs in order, (BLOCK_N, BLOCK_K).
        code = tl.interleave(byte & 0xF, byte >> 4)
        if GROUP % BLOCK_K == 0:
            # One group spans the tile: multiply small integers (codes − zero, exact in fp16
            # and bf16) and apply the group's scale once per output.
            group = outs * (K // GROUP) + start // GROUP
            tile_ok = out_ok & (outs * 0 + start < K)  # the last parts can start past K
            scale = tl.load(scales_ptr + group, mask=tile_ok, other=0.0)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + group, mask=tile_ok, other=0).to(tl.int32)[:, None]
            else:
                zero = 8  # symmetric codes are stored offset by 2^(bits−1)
            w = (code - zero).to(x.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION) * scale[None, :]
        else:
            # Groups narrower than the tile, or not aligned with it: scale every weight.
            group = outs[:, None] * (K // GROUP) + k[None, :] // GROUP
            ok = out_ok[:, None] & k_ok[None, :]
            scale = tl.load(scales_ptr + group, mask=ok, other=0.0)
            if HAS_ZEROS:  # noqa: SIM108 - a constexpr branch: Triton compiles only one side
                zero = tl.load(zeros_ptr + group, mask=ok, other=0).to(tl.int32)
            else:
                zero = 8
            w = ((code - zero).to(tl.float32) * scale).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(
        y_ptr + part * M * N + rows[:, None] * N + outs[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok & out_ok[None, :],
    )


@triton.jit
def _sum_parts_kernel(parts_ptr, y_ptr, SIZE, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """y = the sum of the split-K parts (fp32), in part order, written in y's dtype."""
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = at < SIZE
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for part in tl.static_range(PARTS):
        total += tl.load(parts_ptr + part * SIZE + at, mask=ok, other=0.0)
    tl.store(y_ptr + at, total.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequantize_kernel(
    codes_ptr,
    scales_ptr,
    zeros_ptr,
    w_ptr,  # (N, K) in OUT_DTYPE; for 16-bit types seen as (N, K/2) int32 words
    N,
    K: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte_at = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    ok = (outs[:, None] < N) & (byte_at[None, :] < K // 2)
    byte = tl.load(codes_ptr + outs[:, None] * (K // 2) + byte_at[None, :], mask=ok, other=0)
    byte = byte.to(tl.int32)
    # Byte b holds inputs 2b (low nibble) and 2b + 1 (high nibble).
    if GROUP % (2 * BLOCK_BYTES) == 0:
        # The tile lies in one group per row: one scale (and zero) per row.
        group = outs * (K // GROUP) + tl.program_id(1) * 2 * BLOCK_BYTES // GROUP
        scale_low = tl.load(scales_ptr + group, mask=outs < N, other=0.0)[:, None]
        scale_high = scale_low
        if HAS_ZEROS:
            zero_low = tl.load(zeros_ptr + group, mask=outs < N, other=0).to(tl.int32)[:, None]
        else:
            zero_low = 8
        zero_high = zero_low
    else:
        group_low = outs[:, None] * (K // GROUP) + (2 * byte_at[None, :]) // GROUP
        group_high = outs[:, None] * (K // GROUP) + (2 * byte_at[None, :] + 1) // GROUP
        scale_low = tl.load(scales_ptr + group_low, mask=ok, other=0.0)
        scale_high = tl.load(scales_ptr + group_high, mask=ok, other=0.0)
        if HAS_ZEROS:
            zero_low = tl.load(zeros_ptr + group_low, mask=ok, other=0).to(tl.int32)
            zero_high = tl.load(zeros_ptr + group_high, mask=ok, other=0).to(tl.int32)
        else:
            zero_low = 8
            zero_high = 8
    low = (((byte & 0xF) - zero_low).to(tl.float32) * scale_low).to(OUT_DTYPE)
    high = (((byte >> 4) - zero_high).to(tl.float32) * scale_high).to(OUT_DTYPE)
    if OUT_DTYPE.primitive_bitwidth == 16:
        # Both 16-bit weights of a byte in one 32-bit word, the even input in the low half
        # (little-endian): whole words, written side by side.
        low_bits = low.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        high_bits = high.to(tl.int16, bitcast=True).to(tl.int32) << 16
        tl.store(w_ptr + outs[:, None] * (K // 2) + byte_at[None, :], low_bits | high_bits, mask=ok)
    else:
        k = 2 * tl.program_id(1) * BLOCK_BYTES + tl.arange(0, 2 * BLOCK_BYTES)
        tl.store(
            w_ptr + outs[:, None] * K + k[None, :],
            tl.interleave(low, high),
            mask=(outs[:, None] < N) & (k[None, :] < K),
        )


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def launch_config(rows: int, out_features: int, in_features: int, group_size: int) -> LaunchConfig:
    """Tile sizes for the fused kernel: the fastest of the benchmark's sweep on an H100."""
    # The widest tile that one group spans, so the scale is applied per output, not per weight.
    block_k = next((k for k in (128, 64, 32) if group_size % k == 0), 64)
    tiles_k = triton.cdiv(in_features, block_k)
    if rows <= 16:
        # Decoding: tensor-core tiles are at least 16 rows, so M pads to 16. Narrow tiles of W,
        # each split over 8 parts of the inputs, keep many bytes in flight on every
        # multiprocessor (4096² on an H100: the five fastest of 120 tilings were within 3%).
        return LaunchConfig(16, 32, block_k, min(8, tiles_k), 2, 2)
    return LaunchConfig(64, 64, block_k, min(2, tiles_k), 8, 3)


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T`` in x's dtype for the packed 4-bit weight (see the module's docstring).

    Up to `FUSED_MAX_ROWS` rows, or whenever `config` is given, the fused kernel runs with
    that configuration (the benchmark's tile sweep passes it); otherwise the weight is
    dequantized and cuBLAS multiplies.
    """
    out_features, in_features = codes.shape[0], codes.shape[1] * 2
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} input features, the packed weight {in_features}")
    x2 = x.reshape(-1, in_features).contiguous()
    rows = x2.shape[0]
    if config is None and rows > FUSED_MAX_ROWS:
        w = dequantize_int4(codes, scales, zeros, group_size, x.dtype)
        return torch.nn.functional.linear(x, w)
    c = config or launch_config(rows, out_features, in_features, group_size)
    # Partial sums stay fp32 until they are added; a single part is written in x's dtype.
    partial_dtype = torch.float32 if c.split_k > 1 else x.dtype
    y = torch.empty(c.split_k, rows, out_features, dtype=partial_dtype, device=x.device)
    grid = (triton.cdiv(rows, c.block_m), triton.cdiv(out_features, c.block_n), c.split_k)
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
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=c.block_k,
        SPLIT_K=c.split_k,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    if c.split_k == 1:
        return y[0].view(*x.shape[:-1], out_features)
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block = 1024
    _sum_parts_kernel[(triton.cdiv(out.numel(), block),)](
        y, out, out.numel(), PARTS=c.split_k, BLOCK=block
    )
    return out.view(*x.shape[:-1], out_features)


def dequantize_int4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The (out, in) weight in `dtype` from its packed codes: one read, one write."""
    out_features, in_features = codes.shape[0], codes.shape[1] * 2
    w = torch.empty(out_features, in_features, dtype=dtype, device=codes.device)
    pairs = dtype.itemsize == 2
    # Tiles of 128 inputs, or the widest that one group spans (scales then load per row).
    block_bytes = next((b for b in (64, 32, 16) if group_size % (2 * b) == 0), 64)
    block_n = 32
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(in_features // 2, block_bytes))
    _dequantize_kernel[grid](
        codes.contiguous(),
        scales.float().contiguous(),
        zeros.contiguous() if zeros is not None else codes,
        w.view(torch.int32) if pairs else w,
        out_features,
        in_features,
        GROUP=group_size,
        HAS_ZEROS=zeros is not None,
        OUT_DTYPE=_TRITON_DTYPES[dtype],
        BLOCK_N=block_n,
        BLOCK_BYTES=block_bytes,
    )
    return w
