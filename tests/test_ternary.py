"""Ternary absmean quantization, the straight-through estimator, and trit packing (docs/ops.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmoe_runtime.format.packing import BITS_PER_WEIGHT, pack_trits, packed_cols, unpack_trits
from bmoe_runtime.nn.ternary import EPS, absmean_scale, fake_quantize, quantize

W = torch.tensor([[0.5, -1.0, 0.1, 2.0],  # mean|w| = 0.9 → w/s = .56, -1.11, .11, 2.22
                  [0.0, 0.3, -0.2, 0.1]])  # mean|w| = 0.15 → 0, 2, -1.33, .67


def test_quantize_hand_computed_per_row():
    trits, scale = quantize(W)
    assert trits.dtype == torch.int8 and scale.dtype == torch.float32
    assert trits.shape == (2, 4) and scale.shape == (2,)
    assert trits.tolist() == [[1, -1, 0, 1], [0, 1, -1, 1]]
    torch.testing.assert_close(scale, torch.tensor([0.9, 0.15]), rtol=1e-6, atol=0)


def test_quantize_hand_computed_per_tensor():
    trits, scale = quantize(W, per_row=False)
    # mean|w| over all 8 = (3.6 + 0.6) / 8 = 0.525
    torch.testing.assert_close(scale, torch.tensor([0.525, 0.525]), rtol=1e-6, atol=0)
    # w / 0.525: .95, -1.90, .19, 3.81 | 0, .57, -.38, .19
    assert trits.tolist() == [[1, -1, 0, 1], [0, 1, 0, 0]]


def test_quantize_random_matches_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 17, 29, generator=g, dtype=torch.float64)  # batched [..., N, K], float64 input
    trits, scale = quantize(w)
    assert trits.dtype == torch.int8 and set(trits.unique().tolist()) <= {-1, 0, 1}
    assert scale.shape == (3, 17)
    ref_scale = w.abs().mean(-1)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    ref = torch.clamp(torch.round(w / ref_scale[..., None]), -1, 1)
    # no ties at ±0.5 in random data, so float32 vs float64 rounding agree
    assert torch.equal(trits.double(), ref)
    assert set(trits.unique().tolist()) == {-1, 0, 1}


def test_zero_row_is_safe():
    trits, scale = quantize(torch.zeros(2, 5))
    assert (trits == 0).all()
    assert (scale == EPS).all()
    assert torch.isfinite(fake_quantize(torch.zeros(2, 5))).all()


@pytest.mark.parametrize("per_row", [True, False])
def test_fake_quantize_forward_is_trits_times_scale(per_row):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g)
    trits, scale = quantize(w, per_row)
    expected = trits.float() * scale[:, None]
    with torch.no_grad():
        torch.testing.assert_close(fake_quantize(w, per_row), expected, rtol=0, atol=0)
    # with autograd on, the STE form w + (wq − w).detach() equals it up to float rounding
    wg = w.clone().requires_grad_()
    torch.testing.assert_close(fake_quantize(wg, per_row).detach(), expected, rtol=0, atol=1e-6)
    # at most 3 distinct values per row: −s, 0, +s
    assert all(len(r.unique()) <= 3 for r in expected)


@pytest.mark.parametrize("per_row", [True, False])
def test_ste_gradient_is_identity(per_row):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 9, generator=g, requires_grad=True)
    upstream = torch.randn(6, 9, generator=g)
    fake_quantize(w, per_row).backward(upstream)
    torch.testing.assert_close(w.grad, upstream, rtol=0, atol=0)


def test_absmean_scale_shapes():
    w = torch.randn(2, 3, 4)
    assert absmean_scale(w).shape == (2, 3, 1)
    assert absmean_scale(w, per_row=False).shape == (2, 1, 1)


# ---- packing ------------------------------------------------------------------------------------

def test_2bit_hand_computed_byte():
    # trit k at bits 2k: codes 01 (+1), 10 (−1), 00 (0), 01 (+1) → 0b01_00_10_01
    packed = pack_trits(np.array([[1, -1, 0, 1]], np.int8), "2bit")
    assert packed.dtype == np.uint8 and packed.tolist() == [[0x49]]
    assert unpack_trits(np.array([[0x49]], np.uint8), 4, "2bit").tolist() == [[1, -1, 0, 1]]


def test_base3_hand_computed_byte():
    # digits t+1 = 2, 0, 1, 2, 0 → 2 + 0·3 + 1·9 + 2·27 + 0·81 = 65
    packed = pack_trits(np.array([[1, -1, 0, 1, -1]], np.int8), "base3")
    assert packed.tolist() == [[65]]
    assert unpack_trits(np.array([[65]], np.uint8), 5, "base3").tolist() == [[1, -1, 0, 1, -1]]


def test_padding_slots():
    # 2bit, K=5: second byte holds trit 4 in bits 0-1, padding 00
    assert pack_trits(np.array([[0, 0, 0, 0, -1]], np.int8), "2bit").tolist() == [[0, 0b10]]
    # base3, K=7: second byte digits (t5+1, t6+1, 1, 1, 1) = 2 + 0·3 + 9 + 27 + 81
    assert pack_trits(np.array([[0, 0, 0, 0, 0, 1, -1]], np.int8), "base3").tolist() == [[121, 2 + 9 + 27 + 81]]
    # all-zero rows: 2bit bytes are 0; base3 bytes are 1+3+9+27+81 = 121
    assert pack_trits(np.zeros((1, 8), np.int8), "2bit").tolist() == [[0, 0]]
    assert pack_trits(np.zeros((1, 10), np.int8), "base3").tolist() == [[121, 121]]


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 13, 64, 99])
def test_round_trip(packing, k):
    rng = np.random.default_rng(k)
    t = rng.integers(-1, 2, size=(11, k)).astype(np.int8)
    p = pack_trits(t, packing)
    assert p.dtype == np.uint8 and p.shape == (11, packed_cols(k, packing))
    assert p.shape[1] == -(-k // (4 if packing == "2bit" else 5))
    back = unpack_trits(p, k, packing)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, t)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_round_trip_of_quantized_weights(packing):
    trits, _ = quantize(torch.randn(8, 30, generator=torch.Generator().manual_seed(3)))
    t = trits.numpy()
    np.testing.assert_array_equal(unpack_trits(pack_trits(t, packing), 30, packing), t)


def test_every_byte_decodes_as_spec():
    # independent decoders over all 256 bytes
    for b in range(256):
        arr = np.array([[b]], np.uint8)
        codes = [(b >> (2 * i)) & 3 for i in range(4)]
        if 3 in codes:
            with pytest.raises(ValueError, match="11"):
                unpack_trits(arr, 4, "2bit")
        else:
            assert unpack_trits(arr, 4, "2bit")[0].tolist() == [{0: 0, 1: 1, 2: -1}[c] for c in codes]
        if b > 242:
            with pytest.raises(ValueError, match="242"):
                unpack_trits(arr, 5, "base3")
        else:
            assert unpack_trits(arr, 5, "base3")[0].tolist() == [(b // 3 ** i) % 3 - 1 for i in range(5)]


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="11"):
        unpack_trits(np.array([[0x49, 0b1100_0000]], np.uint8), 8, "2bit")
    with pytest.raises(ValueError, match="242"):
        unpack_trits(np.array([[65, 250]], np.uint8), 10, "base3")
    with pytest.raises(ValueError):
        pack_trits(np.array([[0, 2, 1]], np.int8))
    with pytest.raises(ValueError):
        pack_trits(np.array([0, 1, -1], np.int8))  # not 2-D
    with pytest.raises(ValueError, match="unknown packing"):
        pack_trits(np.zeros((1, 4), np.int8), "3bit")
    with pytest.raises(ValueError, match="expected 2"):
        unpack_trits(np.zeros((1, 3), np.uint8), 5, "2bit")  # wrong Kb
    with pytest.raises(ValueError, match="uint8"):
        unpack_trits(np.zeros((1, 2), np.int16), 5, "2bit")


def test_bits_per_weight():
    assert BITS_PER_WEIGHT == {"2bit": 2.0, "base3": 1.6}
