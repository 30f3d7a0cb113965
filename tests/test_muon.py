"""Muon: the Newton–Schulz orthogonalisation against the SVD, the optimizer against PyTorch's."""

from __future__ import annotations

import pytest
import torch

from slmlab.train.muon import Muon, orthogonalize

# A quintic whose fixed point 1 attracts every singular value in (0, 1]: iterated long enough
# it converges to the polar factor U·Vᵀ itself (Jordan's default trades that for speed).
CONVERGING = (15 / 8, -10 / 8, 3 / 8)


@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32)])
def test_orthogonalize_converges_to_the_polar_factor(shape) -> None:
    g = torch.Generator().manual_seed(0)
    # Singular values from 1 to 10: well enough conditioned for 30 steps to converge.
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g))
    s = torch.linspace(1, 10, min(shape))
    matrix = u @ torch.diag(s) @ v.T
    torch.testing.assert_close(
        orthogonalize(matrix, steps=30, coefficients=CONVERGING), u @ v.T, atol=1e-5, rtol=0
    )


def test_five_default_steps_keep_the_singular_vectors_and_bring_the_values_near_one() -> None:
    matrix = torch.randn(64, 160, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = orthogonalize(matrix)
    inner = u.T @ result @ vh.T  # diagonal exactly when the singular vectors are kept
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 1e-4
    values = torch.diagonal(inner)
    assert values.min() > 0.6 and values.max() < 1.25, values


def test_orthogonalize_wants_a_matrix() -> None:
    with pytest.raises(ValueError, match=r"takes a matrix.*\(2, 3, 4\)"):
        orthogonalize(torch.zeros(2, 3, 4))


def _steps(optimizer_factory, params, grads):
    """Apply `grads` (one list per step) to copies of `params`; return the copies."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    optimizer = optimizer_factory(params)
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


def test_muon_steps_match_pytorchs_muon() -> None:
    """Three steps (momentum, Nesterov, decay, the AdamW-matched scale) against
    `torch.optim.Muon`, which orthogonalises in bf16: equal to bf16's precision."""
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(32, 96, generator=g), torch.randn(96, 32, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    ours = _steps(lambda ps: Muon([{"params": ps, "muon": True}], lr=0.02), params, grads)
    theirs = _steps(
        lambda ps: torch.optim.Muon(ps, lr=0.02, adjust_lr_fn="match_rms_adamw"), params, grads
    )
    for p, a, b in zip(params, ours, theirs, strict=True):
        ours_moved, theirs_moved = a - p, b - p
        assert theirs_moved.norm() > 0.1  # the test compares real steps
        # bf16 keeps 8 bits of each number: the two steps differ by about 1% as a whole.
        assert (ours_moved - theirs_moved).norm() < 0.02 * theirs_moved.norm()


def test_the_other_groups_are_adamw_to_the_bit() -> None:
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(40, 24, generator=g), torch.randn(24, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(4)]

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]

    ours = _steps(lambda ps: Muon(groups(ps), lr=3e-3, betas=(0.9, 0.95)), params, grads)
    theirs = _steps(
        lambda ps: torch.optim.AdamW(groups(ps), lr=3e-3, betas=(0.9, 0.95), foreach=False),
        params,
        grads,
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_vector_in_a_muon_group_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"shape \(8,\) belongs in a group with muon=False"):
        Muon([{"params": [torch.zeros(8, requires_grad=True)], "muon": True}])
