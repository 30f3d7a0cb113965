"""GGUF's Q4_K written: llama.cpp's reference quantizer (``quantize_row_q4_K_ref``) in numpy.

The ``gguf`` package reads every k-quant but writes none, so this is the one GGUF format slmlab
quantizes itself. A Q4_K *super-block* holds 256 weights in 144 bytes (4.5 bits a weight):

* eight sub-blocks of 32 weights, each stored as ``x ≈ d·sc·q − dmin·m`` with 4-bit codes
  ``q`` (0..15), so every sub-block has its own scale and its own offset, as Q4_1 has;
* but the sub-blocks' scales ``sc`` and offsets ``m`` are themselves quantized, to 6 bits
  against two fp16 numbers ``d`` and ``dmin`` of the super-block: quantization applied twice,
  which is what buys Q4_1's accuracy at Q4_0's size.

Each sub-block's scale and offset are not the min-max ones: llama.cpp searches 21 candidate
scales and, for each, solves the weighted least-squares line through the codes it gives
(weights ``rms(x) + |x|``, so large weights count more), keeping the best. The codes are then
recomputed against the 6-bit scales actually stored.

The arithmetic follows the C reference operation by operation in float32 (sums accumulated in
the same order), so the bytes are the reference's wherever the C compiler did not fuse a
multiply and an add; `benchmarks/targets.py` compares them with llama.cpp's own quantizer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Q4_K_BLOCK", "Q4_K_BYTES", "quantize_q4_k"]

Q4_K_BLOCK = 256  # weights a super-block holds
Q4_K_BYTES = 144  # d, dmin (fp16), 12 bytes of 6-bit scales and offsets, 128 bytes of codes
_SUB = 32
_F = np.float32


def _nearest(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: round half to even, of a float32 (exact below 2**22)."""
    return np.rint(values).astype(np.int32)


def _sum(terms: np.ndarray) -> np.ndarray:
    """Float32 sum over the last axis, left to right as the C loop adds (numpy's pairwise
    summation would round differently)."""
    total = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        total += terms[..., i]
    return total


def _make_qkx2(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants`` for each row of `x` (sub-blocks) at once: the scale, the
    offset (returned positive: x ≈ scale·L − offset) and the codes L of the weighted
    least-squares fit that wins among `nstep` + 1 candidate scales and plain min-max."""
    lo = np.minimum(x.min(-1), _F(0))
    hi = x.max(-1)
    sum_w = _sum(w)
    sum_x = _sum(w * x)
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore"):
        span = np.where(flat, _F(1), hi - lo)
        iscale = _F(nmax) / span
        scale = _F(1) / iscale
        codes = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        diff = scale[:, None] * codes.astype(_F) + lo[:, None] - x
        best = _sum(w * (diff * diff))
        for step in range(nstep + 1):
            # As in C, a candidate that wins moves the offset the next candidates start from.
            span = np.where(flat, _F(1), hi - lo)
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / span
            trial = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(_F)
            sum_l = _sum(w * trial)
            sum_l2 = _sum(w * trial * trial)
            sum_xl = _sum(w * trial * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, _F(0), this_min)
            diff = this_scale[:, None] * trial + this_min[:, None] - x
            error = _sum(w * (diff * diff))
            better = (det > 0) & (error < best) & ~flat  # C returns before the search
            codes = np.where(better[:, None], trial.astype(np.int32), codes)
            best = np.where(better, error, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, _F(0), scale)
    return scale.astype(_F), (-lo).astype(_F), codes


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Rows of `data` (..., n), n a multiple of 256, as Q4_K super-blocks: uint8 (..., n / 256
    · 144), the bytes GGUF stores (``gguf.quants.dequantize(out, Q4_K)`` reads them back)."""
    if data.shape[-1] % Q4_K_BLOCK:
        raise ValueError(
            f"Q4_K needs rows that are multiples of {Q4_K_BLOCK} weights, got {data.shape[-1]}"
        )
    out_shape = (*data.shape[:-1], data.shape[-1] // Q4_K_BLOCK * Q4_K_BYTES)
    x = np.ascontiguousarray(data, dtype=_F).reshape(-1, 8, _SUB)
    blocks = x.shape[0]
    out = np.empty((blocks, Q4_K_BYTES), dtype=np.uint8)
    chunk = 16384  # super-blocks at a time: bounds the temporaries at a few tens of MB
    for start in range(0, blocks, chunk):
        out[start : start + chunk] = _quantize_blocks(x[start : start + chunk])
    return out.reshape(out_shape)


def _quantize_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(-1, _SUB)
    av_x = np.sqrt(_sum(sub * sub) / _F(_SUB))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, codes = _make_qkx2(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins, codes = scales.reshape(n, 8), mins.reshape(n, 8), codes.reshape(n, 8, _SUB)

    max_scale = np.maximum(scales.max(-1), _F(0))
    max_min = np.maximum(mins.max(-1), _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    # uint8_t ls = nearest_int(...); MIN(63, ls): the C conversion wraps modulo 256 first.
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins) & 0xFF).astype(np.uint8)
    d = (max_scale / _F(63)).astype(np.float16)
    dmin = (max_min / _F(63)).astype(np.float16)

    packed = np.zeros((n, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4]
    packed[:, 4:8] = lm[:, :4]
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    packed[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    packed[:, 4:8] |= (lm[:, 4:] >> 4) << 6

    # The codes again, against the scales as stored (6 bits, then fp16 d): what a reader sees.
    step = d.astype(_F)[:, None] * ls.astype(_F)
    offset = dmin.astype(_F)[:, None] * lm.astype(_F)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest((x + offset[..., None]) / step[..., None]), 0, 15)
    codes = np.where((step != 0)[..., None], again, codes).astype(np.uint8)

    # 64 weights per 32 bytes: the low nibbles hold sub-block 2k, the high ones 2k + 1.
    pairs = codes.reshape(n, 4, 2, _SUB)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate(
        [d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, qs], axis=1
    )
