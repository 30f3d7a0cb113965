"""GGUF's Q4_K as slmlab writes it: the bytes of llama.cpp's reference quantizer, which the
``gguf`` package's own dequantizer reads back.

The reference here is a line-by-line transcription of ggml-quants.c's
``quantize_row_q4_K_ref`` and ``make_qkx2_quants``, one weight at a time in float32 scalars;
slmlab's is vectorized over sub-blocks. (By hand, against llama.cpp's compiled
``quantize_row_q4_K_ref`` through ctypes, the two agree on every super-block of stories-8m's
Q4_K matrices.)"""

from __future__ import annotations

import numpy as np
import pytest

from slmlab.export.k_quants import Q4_K_BYTES, quantize_q4_k

gguf = pytest.importorskip("gguf")
F = np.float32


def _nearest(value) -> int:
    return int(np.rint(F(value)))


def _make_qkx2(x, w, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], F(w[0] * x[0])
    for i in range(1, len(x)):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w, sum_x = F(sum_w + w[i]), F(sum_x + F(w[i] * x[i]))
    lo = min(lo, F(0))
    if hi == lo:
        return F(0), F(-lo), [0] * len(x)
    iscale = F(F(nmax) / F(hi - lo))
    scale, best, codes = F(F(1) / iscale), F(0), []
    for i in range(len(x)):
        codes.append(max(0, min(nmax, _nearest(F(iscale * F(x[i] - lo))))))
        diff = F(F(F(scale * F(codes[i])) + lo) - x[i])
        best = F(best + F(w[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(hi - lo))
        trial = [max(0, min(nmax, _nearest(F(iscale * F(v - lo))))) for v in x]
        sl = sl2 = sxl = F(0)
        for v, wi, q in zip(x, w, trial, strict=True):
            sl = F(sl + F(wi * F(q)))
            sl2 = F(sl2 + F(F(wi * F(q)) * F(q)))
            sxl = F(sxl + F(F(wi * F(q)) * v))
        det = F(F(sum_w * sl2) - F(sl * sl))
        if det > 0:
            this_scale = F(F(F(sum_w * sxl) - F(sum_x * sl)) / det)
            this_min = F(F(F(sl2 * sum_x) - F(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = F(0), F(sxl / sl2)
            error = F(0)
            for v, wi, q in zip(x, w, trial, strict=True):
                diff = F(F(F(this_scale * F(q)) + this_min) - v)
                error = F(error + F(wi * F(diff * diff)))
            if error < best:
                codes, best, scale, lo = trial, error, this_scale, this_min
    return scale, F(-lo), codes


def _reference_block(x: np.ndarray) -> np.ndarray:
    """One super-block of 256 weights, as quantize_row_q4_K_ref writes it."""
    scales, mins, codes = [], [], []
    for j in range(8):
        sub = x[32 * j : 32 * j + 32]
        sum_x2 = F(0)
        for v in sub:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        weights = [F(av_x + F(abs(v))) for v in sub]
        scale, offset, sub_codes = _make_qkx2(sub, weights)
        scales.append(scale), mins.append(offset), codes.append(sub_codes)
    max_scale, max_min = max([F(0), *scales]), max([F(0), *mins])
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    packed = [0] * 12
    stored = []
    for j in range(8):
        ls = min(63, _nearest(F(inv_scale * scales[j])) & 0xFF)
        lm = min(63, _nearest(F(inv_min * mins[j])) & 0xFF)
        stored.append((ls, lm))
        if j < 4:
            packed[j], packed[j + 4] = ls, lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6
    d, dmin = np.float16(max_scale / F(63)), np.float16(max_min / F(63))
    for j, (ls, lm) in enumerate(stored):
        step = F(F(d) * F(ls))
        if not step:
            continue
        offset = F(F(dmin) * F(lm))
        for i in range(32):
            value = F(F(x[32 * j + i] + offset) / step)
            codes[j][i] = max(0, min(15, _nearest(value)))
    qs = []
    for j in range(0, 8, 2):
        qs += [codes[j][i] | (codes[j + 1][i] << 4) for i in range(32)]
    head = np.array([d, dmin], dtype=np.float16).view(np.uint8)
    return np.concatenate([head, np.array(packed + qs, dtype=np.uint8)])


def _blocks() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 256)) * 0.02).astype(F)
    x[1, 40] = 0.9  # an outlier that sets its super-block's scale
    x[2, :32] = 0.0  # a sub-block of zeros (its scale is 0: the codes are not recomputed)
    x[3, 32:64] = 0.01  # a constant positive sub-block (its minimum is clamped to 0)
    x[3, 64:96] = -0.02  # a constant negative one: no span, the C returns before its search
    x[4] = np.abs(x[4])  # all positive: every offset fits at zero
    x[5] = rng.standard_t(2, 256).astype(F) * 0.05  # heavy tails
    return x


def test_q4_k_bytes_are_llama_cpps_reference_quantizer() -> None:
    x = _blocks()
    ours = quantize_q4_k(x)
    assert ours.shape == (6, Q4_K_BYTES) and ours.dtype == np.uint8
    for row in range(len(x)):
        np.testing.assert_array_equal(ours[row], _reference_block(x[row]), err_msg=f"row {row}")


def test_q4_k_reads_back_through_ggufs_dequantizer_closer_than_q4_1() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((32, 512)) * 0.02).astype(F)
    back = gguf.quants.dequantize(quantize_q4_k(x), gguf.GGMLQuantizationType.Q4_K)
    assert back.shape == x.shape
    q4_1 = gguf.quants.dequantize(
        gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1
    )
    error, error_q4_1 = np.sqrt(((back - x) ** 2).mean()), np.sqrt(((q4_1 - x) ** 2).mean())
    # 4.5 bits a weight against Q4_1's 5: the searched scales more than pay for the 6-bit ones.
    assert error < 0.95 * error_q4_1
    assert np.abs(back - x).max() < 0.25 * np.abs(x).max()


def test_q4_k_refuses_rows_that_are_not_whole_super_blocks() -> None:
    with pytest.raises(ValueError, match=r"multiples of 256.*288"):
        quantize_q4_k(np.zeros((2, 288), F))
