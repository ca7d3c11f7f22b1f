"""Sizes and pair layout of a butterfly over d coordinates (docs/ops.md), free of torch so
the PyTorch model (butterfly.py) and the Numba runtime (numba_ops.py) share one definition."""

from __future__ import annotations

import numpy as np


def padded_size(d: int) -> int:
    """Next power of two ≥ d (the butterfly works on P = 2^S coordinates)."""
    if d < 2:
        raise ValueError(f"butterfly size must be ≥ 2, got {d}")
    return 1 << (d - 1).bit_length()


def n_stages(d: int) -> int:
    return padded_size(d).bit_length() - 1


def angle_shape(d: int) -> tuple[int, int]:
    """(stages, pairs per stage) of one butterfly over d coordinates."""
    return n_stages(d), padded_size(d) // 2


def active_mask(d: int) -> np.ndarray:
    """[S, P/2] bool: pair k of stage s is a real rotation (both ends < d).

    Pairs that would mix a real coordinate with zero padding stay identity, so the
    d×d operator is exactly orthogonal for any d (not only powers of two).
    """
    s_count, half = angle_shape(d)
    k = np.arange(half)
    return np.stack([((((k >> s) << (s + 1)) | (k & ((1 << s) - 1))) + (1 << s)) < d for s in range(s_count)])
