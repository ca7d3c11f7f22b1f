"""Butterfly rotations against docs/ops.md's ButterflyRotate, rebuilt independently in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bmoe_runtime.nn.butterfly import ButterflyRotation, active_pairs, angle_shape, padded_size

DIMS = [2, 3, 64, 512, 768]


def random_rotation(d: int, n_experts: int = 1, seed: int = 0, dtype=torch.float64) -> ButterflyRotation:
    """A bank with angles spread over the whole circle (far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    rot = ButterflyRotation(d, n_experts, generator=g).to(dtype)
    with torch.no_grad():
        rot.angles.uniform_(-math.pi, math.pi, generator=g)
    return rot


def spec_matrix(angles: np.ndarray, d: int) -> np.ndarray:
    """Dense B(θ) per docs/ops.md, one explicit Givens rotation at a time.

    angles [S, P/2]. Stage s (h = 2^s) pairs j with j + h for j mod 2h < h; pair k of the
    stage is the k-th such j in increasing order; each pair is z_j' = c z_j − s z_{j+h},
    z_{j+h}' = s z_j + c z_{j+h}; pairs with j + h ≥ d are identity. B = G_{S−1} ⋯ G_0, and
    the d×d operator is pad → stages → truncate.
    """
    p = 1
    while p < d:
        p *= 2
    s_count = p.bit_length() - 1
    assert angles.shape == (s_count, p // 2)
    b = np.eye(p)
    for s in range(s_count):
        h = 2 ** s
        js = [j for j in range(p) if j % (2 * h) < h]  # increasing j: pair number k = position
        assert len(js) == p // 2
        g = np.eye(p)
        for k, j in enumerate(js):
            if j + h >= d:
                continue
            c, sn = math.cos(angles[s, k]), math.sin(angles[s, k])
            g[j, j], g[j, j + h] = c, -sn
            g[j + h, j], g[j + h, j + h] = sn, c
        b = g @ b  # later stages act after earlier ones
    # columns of the d×d operator: truncate(B · pad(e_j))
    return b[:d, :d]


def test_shapes_and_active_pairs():
    assert padded_size(2) == 2 and padded_size(3) == 4 and padded_size(768) == 1024
    assert angle_shape(768) == (10, 512)
    assert angle_shape(2) == (1, 1)
    act = active_pairs(3)  # P=4: stage 0 pairs (0,1),(2,3); stage 1 pairs (0,2),(1,3)
    assert act.tolist() == [[True, False], [True, False]]
    assert bool(active_pairs(64).all())
    with pytest.raises(ValueError):
        padded_size(1)


@pytest.mark.parametrize("d", [2, 3, 5, 8, 12, 48, 64, 96])
def test_matrix_matches_independent_spec(d):
    rot = random_rotation(d, n_experts=3, seed=d)
    for e in range(3):
        ref = spec_matrix(rot.angles[e].detach().numpy(), d)
        np.testing.assert_allclose(rot.matrix(e).numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [3, 100])
def test_matrix_matches_spec_in_float32(d):
    rot = random_rotation(d, n_experts=2, seed=7, dtype=torch.float32)
    ref = spec_matrix(rot.angles[1].detach().double().numpy(), d)
    np.testing.assert_allclose(rot.matrix(1).double().numpy(), ref, rtol=0, atol=1e-5)


def test_spec_sign_convention_single_rotation():
    # d=2: one rotation by θ: [[c, -s], [s, c]]
    rot = ButterflyRotation(2, 1).double()
    with torch.no_grad():
        rot.angles.fill_(0.3)
    c, s = math.cos(0.3), math.sin(0.3)
    np.testing.assert_allclose(rot.matrix().numpy(), [[c, -s], [s, c]], atol=1e-15)
    y = rot(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    np.testing.assert_allclose(y.detach().numpy(), [[c, s]], atol=1e-15)


def test_inactive_angles_are_ignored():
    d = 5  # P=8: pairs reaching past index 4 must be identity whatever their angle
    rot = random_rotation(d, seed=1)
    before = rot.matrix().clone()
    with torch.no_grad():
        rot.angles[0][~rot.active] = 1.234
    torch.testing.assert_close(rot.matrix(), before, rtol=0, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_orthogonal_and_norm_preserving(d):
    rot = random_rotation(d, n_experts=2, seed=d)
    b = rot.matrix(1)
    eye = torch.eye(d, dtype=torch.float64)
    assert (b.T @ b - eye).abs().max().item() < 1e-5
    assert (b @ b.T - eye).abs().max().item() < 1e-5
    x = torch.randn(16, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = rot(x, idx)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("d", DIMS)
def test_norm_preserving_float32(d):
    rot = random_rotation(d, seed=d, dtype=torch.float32)
    x = torch.randn(8, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = rot(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    b = rot.matrix().double()
    assert (b.T @ b - torch.eye(d, dtype=torch.float64)).abs().max().item() < 1e-5


@pytest.mark.parametrize("d", DIMS)
def test_transpose_inverts(d):
    rot = random_rotation(d, n_experts=4, seed=d)
    x = torch.randn(10, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    idx = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = rot(x, idx)
        assert (y - x).abs().max() > 1e-3  # really rotated
        torch.testing.assert_close(rot(y, idx, transpose=True), x, rtol=0, atol=1e-10)
        torch.testing.assert_close(rot(rot(x, idx, transpose=True), idx), x, rtol=0, atol=1e-10)
        # transpose=True applies exactly Bᵀ
        bt = rot.matrix(2).T
        torch.testing.assert_close(rot(x[:1], torch.tensor([2]), transpose=True)[0], bt @ x[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("d", [3, 64, 96])
@pytest.mark.parametrize("transpose", [False, True])
def test_per_row_experts_equal_per_expert_loop(d, transpose):
    n = 5
    rot = random_rotation(d, n_experts=n, seed=11)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, d, dtype=torch.float64, generator=g)
    idx = torch.randint(0, n, (37,), generator=g)
    with torch.no_grad():
        batched = rot(x, idx, transpose=transpose)
        for e in range(n):
            rows = (idx == e).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            single = rot(x[rows], torch.full((len(rows),), e), transpose=transpose)
            torch.testing.assert_close(batched[rows], single, rtol=0, atol=0)
            m = rot.matrix(e)
            dense = x[rows] @ (m if transpose else m.T)  # rows: (B x)ᵀ = xᵀ Bᵀ
            torch.testing.assert_close(batched[rows], dense, rtol=0, atol=1e-12)


def test_expert_index_checks():
    rot = ButterflyRotation(8, 3)
    with pytest.raises(ValueError, match="expert_index"):
        rot(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="last dim"):
        rot(torch.zeros(2, 7), torch.zeros(2, dtype=torch.long))


def test_gradient_reaches_angles():
    d = 12  # not a power of two: inactive slots get no gradient
    rot = random_rotation(d, n_experts=3, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20, d, dtype=torch.float64, generator=g)
    idx = torch.tensor([0, 2] * 10)  # expert 1 unused
    target = torch.randn(20, d, dtype=torch.float64, generator=g)
    loss = ((rot(x, idx) - target) ** 2).sum() + ((rot(x, idx, transpose=True) - target) ** 2).sum()
    loss.backward()
    grad = rot.angles.grad
    assert grad is not None
    act = rot.active
    assert (grad[0][act] != 0).all() and (grad[2][act] != 0).all()
    assert (grad[1] == 0).all()  # unused expert
    assert (grad[:, ~act] == 0).all()  # identity slots
    # finite-difference check of one active angle
    s, k = 1, 0
    assert act[s, k]
    eps = 1e-6

    def f(delta):
        with torch.no_grad():
            a = rot.angles.clone()
            a[2, s, k] += delta
            r2 = ButterflyRotation(d, 3).double()
            r2.angles.copy_(a)
            return (((r2(x, idx) - target) ** 2).sum() + ((r2(x, idx, transpose=True) - target) ** 2).sum()).item()

    fd = (f(eps) - f(-eps)) / (2 * eps)
    assert grad[2, s, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_static_rotation_is_a_buffer():
    rot = ButterflyRotation(16, 2, trainable=False, generator=torch.Generator().manual_seed(0))
    assert list(rot.parameters()) == []
    assert "angles" in dict(rot.named_buffers())
    assert "angles" in rot.state_dict()
    assert rot.angles.abs().max() > 1.0  # uniformly random over (−π, π), not near identity
