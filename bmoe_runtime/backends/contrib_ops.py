"""Reference implementations of the ONNX Runtime contrib ops bmoe exports (com.microsoft).

MatMulNBits: Y = A · dequant(B)ᵀ with B [N, k_blocks, blob_size] uint8 holding `bits`-bit
codes blockwise along K (4 bits: element 2i in the low nibble, 2i+1 in the high one), one
float scale per (row, block) and, with no zero_points input, the zero point 2^(bits-1).
accuracy_level 4 (what bmoe writes: ORT's fast CPU path, and its only fast one for 8 bits) quantizes A
too, per block of block_size along K: int8, step max|a|/127, round to nearest; other levels compute in
fp32 on CPU.

GatherBlockQuantized: rows of such a table gathered and dequantized (the embedding lookups), with
gather_axis 0, blocks along the last axis, no zero_points.
This is the subset bmoe writes (exporters/compress.py); anything else is rejected with an
OpError rather than computed wrongly. Checked against ONNX Runtime in tests/test_compress.py.
"""

from __future__ import annotations

import numpy as np

from bmoe_runtime.errors import OpError

DOMAIN = "com.microsoft"


def unpack_codes(b: np.ndarray, bits: int) -> np.ndarray:
    """uint8 blobs [..., blob_size] → codes [..., blob_size · 8 / bits] (uint8)."""
    if bits == 8:
        return b
    lo, hi = b & 0x0F, b >> 4
    return np.stack((lo, hi), axis=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


def dequantize_nbits(b: np.ndarray, scales: np.ndarray, k: int, bits: int) -> np.ndarray:
    """B [N, k_blocks, blob] + scales [N·k_blocks] → W [N, K] float32 (zero point 2^(bits-1))."""
    n, k_blocks, _ = b.shape
    w = unpack_codes(b, bits).astype(np.float32)  # in place from here: one float32 copy of W is the peak
    w -= float(1 << (bits - 1))
    w *= scales.reshape(n, k_blocks, 1)
    return w.reshape(n, -1)[:, :k]


def quantize_activations(a: np.ndarray, block_size: int) -> np.ndarray:
    """A [..., K] as accuracy_level 4 sees it: int8 codes per block of K, dequantized back to float32."""
    k = a.shape[-1]
    k_blocks = -(-k // block_size)
    padded = np.zeros((*a.shape[:-1], k_blocks * block_size), np.float32)
    padded[..., :k] = a
    blocks = padded.reshape(*a.shape[:-1], k_blocks, block_size)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    q = np.rint(blocks / np.where(step > 0, step, 1))
    return (q * step).astype(np.float32).reshape(padded.shape)[..., :k]


def matmul_nbits(a: np.ndarray, b: np.ndarray, scales: np.ndarray, zero_points=None, g_idx=None, bias=None, *,
                 K: int, N: int, bits: int = 4, block_size: int, accuracy_level: int = 0) -> np.ndarray:  # noqa: N803
    if zero_points is not None or g_idx is not None:
        raise OpError("MatMulNBits: zero_points and g_idx are not supported by the reference runtime")
    if bits not in (4, 8):
        raise OpError(f"MatMulNBits: bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OpError(f"MatMulNBits: block_size must be a power of two ≥ 16, got {block_size}")
    if K < 1 or N < 1:
        raise OpError(f"MatMulNBits: K and N must be ≥ 1, got K={K} N={N}")
    k_blocks = -(-K // block_size)
    blob = block_size * bits // 8
    if a.dtype != np.float32 or a.ndim < 1 or a.shape[-1] != K:
        raise OpError(f"MatMulNBits: A must be float32 [..., {K}], got {a.dtype} {a.shape}")
    if b.dtype != np.uint8 or b.shape != (N, k_blocks, blob):
        raise OpError(f"MatMulNBits: B must be uint8 {(N, k_blocks, blob)}, got {b.dtype} {b.shape}")
    if scales.dtype != np.float32 or scales.size != N * k_blocks:
        raise OpError(f"MatMulNBits: scales must be float32 with {N * k_blocks} values, got {scales.dtype} {scales.shape}")
    if bias is not None and (bias.dtype != np.float32 or bias.shape != (N,)):
        raise OpError(f"MatMulNBits: bias must be float32 [{N}], got {bias.dtype} {bias.shape}")
    if accuracy_level == 4:
        a = quantize_activations(a, block_size)
    y = a @ dequantize_nbits(b, scales, K, bits).T
    return y if bias is None else y + bias


def gather_block_quantized(data: np.ndarray, indices: np.ndarray, scales: np.ndarray, zero_points=None, *,
                           gather_axis: int = 0, quantize_axis: int = 1, block_size: int = 128,
                           bits: int = 4) -> np.ndarray:
    if zero_points is not None:
        raise OpError("GatherBlockQuantized: zero_points are not supported by the reference runtime")
    if bits not in (4, 8):
        raise OpError(f"GatherBlockQuantized: bits must be 4 or 8, got {bits}")
    if data.dtype != np.uint8 or data.ndim < 2 or gather_axis != 0 or quantize_axis not in (-1, data.ndim - 1):
        raise OpError(f"GatherBlockQuantized: supported is uint8 data of rank ≥ 2, gather_axis 0 and blocks along "
                      f"the last axis; got {data.dtype} {data.shape}, gather_axis {gather_axis}, "
                      f"quantize_axis {quantize_axis}")
    width = data.shape[-1] * 8 // bits
    if block_size < 16 or block_size & (block_size - 1) or width % block_size:
        raise OpError(f"GatherBlockQuantized: block_size {block_size} must be a power of two ≥ 16 dividing {width}")
    if scales.dtype != np.float32 or scales.shape != (*data.shape[:-1], width // block_size):
        raise OpError(f"GatherBlockQuantized: scales must be float32 {(*data.shape[:-1], width // block_size)}, "
                      f"got {scales.dtype} {scales.shape}")
    if indices.dtype not in (np.int32, np.int64):
        raise OpError(f"GatherBlockQuantized: indices must be int32 or int64, got {indices.dtype}")
    n = data.shape[0]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        raise OpError(f"GatherBlockQuantized: indices must be in [-{n}, {n})")
    rows = np.where(indices < 0, indices + n, indices)
    codes = unpack_codes(data[rows], bits).astype(np.float32) - float(1 << (bits - 1))
    blocks = codes.reshape(*codes.shape[:-1], width // block_size, block_size) * scales[rows][..., None]
    return blocks.reshape(codes.shape)
