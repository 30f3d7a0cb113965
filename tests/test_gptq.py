"""GPTQ against a direct implementation of its update rule, and against round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from slmlab.layers.formats import int_codes, int_grid
from slmlab.quant import dequantize, quantize
from slmlab.quant.gptq import gptq_quantize, layer_error


def _layer(rows: int = 24, cols: int = 128, tokens: int = 512, seed: int = 0):
    """A weight and the Hessian of correlated calibration inputs with a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (mixing + torch.eye(cols))
    X[:, :4] *= 8  # outlier features, as real activations have
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    return W, 2 * X.T @ X


def _direct_gptq(W, H, bits, group, symmetric, damp=0.01, order=None, grid=None):
    """Optimal Brain Surgeon's update, column by column, with H⁻¹ of the still-free columns
    inverted afresh at every step: no Cholesky trick, no lazy blocks."""
    W, H = W.clone(), H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    cols = W.shape[1]
    order = list(range(cols)) if order is None else order
    codes = torch.empty(W.shape, dtype=torch.uint8)
    scales, zeros = grid if grid is not None else ({}, {})
    for step, column in enumerate(order):
        g = column // group
        if grid is None and column % group == 0:
            scales[g], zeros[g] = int_grid(W[:, column : column + group], bits, symmetric)
        s, z = (scales[:, g], zeros[:, g]) if grid is not None else (scales[g], zeros[g])
        free = order[step:]
        H_inv = torch.linalg.inv(H[free][:, free])
        q = int_codes(W[:, column], s, z, bits, symmetric)
        codes[:, column] = q
        error = W[:, column] - s * (q.double() - z)
        W[:, free] -= error[:, None] / H_inv[0, 0] * H_inv[0][None, :]
    return codes


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, None])
def test_gptq_equals_the_direct_update_rule(symmetric, group_size) -> None:
    W, H = _layer()
    q = gptq_quantize(
        W, H, bits=4, group_size=group_size, symmetric=symmetric, block_size=64
    )  # two lazy blocks
    group = group_size or W.shape[1]
    expected = _direct_gptq(W, H, 4, group, symmetric)
    assert torch.equal(q.codes, expected)


def test_gptq_act_order_equals_the_direct_rule_in_that_order() -> None:
    W, H = _layer(seed=1)
    q = gptq_quantize(W, H, bits=3, group_size=32, act_order=True, block_size=48)
    order = torch.argsort(H.diagonal(), descending=True, stable=True).tolist()
    assert set(order[:4]) == {0, 1, 2, 3}  # the loud channels are rounded first
    grid = int_grid(W.reshape(W.shape[0], -1, 32), 3, True)  # static groups, from W itself
    expected = _direct_gptq(W, H, 3, 32, True, order=order, grid=grid)
    assert torch.equal(q.codes, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_error_is_never_above_round_to_nearest(bits, act_order) -> None:
    for seed in range(3):
        W, H = _layer(seed=seed)
        rtn = dequantize(quantize(W, "int", bits, group_size=32)).double()
        gptq = dequantize(
            gptq_quantize(W, H, bits=bits, group_size=32, act_order=act_order)
        ).double()
        assert layer_error(W, gptq, H) <= layer_error(W, rtn, H)


def test_gptq_on_a_single_precision_hessian_matches_float64() -> None:
    W, H = _layer(seed=2)
    exact = gptq_quantize(W, H, bits=4, group_size=32)
    single = gptq_quantize(W.float(), H.float(), bits=4, group_size=32)
    assert (single.codes == exact.codes).float().mean() > 0.99


def test_gptq_rejects_a_hessian_of_the_wrong_size() -> None:
    W, H = _layer()
    with pytest.raises(ValueError, match=r"Hessian must be \(128, 128\)"):
        gptq_quantize(W, H[:64, :64])
    with pytest.raises(ValueError, match="does not divide"):
        gptq_quantize(W, H, group_size=48)
