"""The Numba runtime's kernels (bmoe_runtime/backends/numba_ops.py) against the independent
numpy references of tests/ops_reference.py and hand-computed cases, serial and parallel builds."""

from __future__ import annotations

import numpy as np
import pytest

from bmoe_runtime.backends import numba_ops
from bmoe_runtime.format.packing import pack_trits
from ops_reference import butterfly_rotate, ternary_matmul

# (M, K, N); the last two exceed PARALLEL_MIN_WORK = M·N·K ≥ 2^20, so they run the parallel build
TMM_SHAPES = [(1, 1, 1), (3, 5, 7), (5, 100, 33), (9, 300, 65), (0, 10, 4), (16, 1024, 128), (1, 4096, 300)]


def tmm_case(rng, m: int, k: int, n: int, packing: str):
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    a = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    if m > 2:
        a[1] = 0  # all-zero row: act_quant gives a zero row
    return a, pack_trits(t, packing), (rng.random(n) + 0.5).astype(np.float32)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("act_quant", [0, 1])
def test_ternary_matmul_matches_reference(packing, act_quant):
    rng = np.random.default_rng(7)
    for m, k, n in TMM_SHAPES:
        a, w, s = tmm_case(rng, m, k, n, packing)
        y = numba_ops.ternary_matmul(a, w, s, k, packing, act_quant)
        ref = ternary_matmul(a, w, s, k, packing, act_quant)
        assert y.shape == (m, n) and y.dtype == np.float32
        if act_quant:  # integer sums are exact: only the final float32 products round
            np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-30, err_msg=f"{(m, k, n)}")
        else:
            tol = 1e-5 * (1 + np.abs(a).sum(1, keepdims=True)) * np.abs(s)
            assert np.all(np.abs(y - ref) <= tol), f"{(m, k, n)} max err {np.abs(y - ref).max()}"


def test_act_quant_hand_computed():
    # row max 2.0 → s = 2/127; A/s = 127, 31.75, −88.9, 0 → q = 127, 32, −89, 0 (round half away, not floor)
    a = np.array([[2.0, 0.5, -1.4, 0.0]], np.float32)
    t = np.array([[1, 1, 1, 1], [0, -1, 1, 0]], np.int8)
    scale = np.array([1.0, 0.5], np.float32)
    for packing in ("2bit", "base3"):
        y = numba_ops.ternary_matmul(a, pack_trits(t, packing), scale, 4, packing, act_quant=1)
        # Σ q·t = 127 + 32 − 89 = 70 and −32 − 89 = −121
        np.testing.assert_allclose(y, [[2 / 127 * 70, 2 / 127 * 0.5 * -121]], rtol=1e-6)
        y0 = numba_ops.ternary_matmul(a, pack_trits(t, packing), scale, 4, packing, act_quant=0)
        np.testing.assert_allclose(y0, [[1.1, 0.5 * -1.9]], rtol=1e-6)


def test_act_quant_rounds_half_away_from_zero():
    # A/s = ±0.5, ±1.5, ±2.5 exactly (s = 127/127 = 1): half away from zero gives ±1, ±2, ±3 (not banker's 0, 2, 2)
    a = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5]], np.float32)
    eye = np.eye(7, dtype=np.int8)
    y = numba_ops.ternary_matmul(a, pack_trits(eye, "2bit"), np.ones(7, np.float32), 7, "2bit", act_quant=1)
    assert y[0].tolist() == [127, 1, 2, 3, -1, -2, -3]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("transpose", [0, 1])
def test_butterfly_rotate_matches_reference(dtype, transpose):
    rng = np.random.default_rng(3)
    for m, d, e in [(5, 2, 1), (7, 3, 2), (33, 100, 5), (1, 512, 3), (300, 1024, 4)]:  # last: parallel build
        x = rng.standard_normal((m, d)).astype(np.float32)
        s_count = max(1, int(np.ceil(np.log2(d))))
        theta = rng.uniform(-np.pi, np.pi, (e, s_count, (1 << s_count) // 2))
        scale = None
        if dtype == "int8":
            scale = (np.abs(theta).max(axis=(1, 2)) / 127).astype(np.float32)
            angles = np.round(theta / scale[:, None, None]).astype(np.int8)
        else:
            angles = theta.astype(dtype)
        idx = rng.integers(0, e, m).astype(np.int64)
        y = numba_ops.butterfly_rotate(x, angles, idx, scale, transpose)
        ref = butterfly_rotate(x, angles, idx, scale, bool(transpose))
        np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5 * np.sqrt(d), err_msg=f"{(m, d, e)}")
