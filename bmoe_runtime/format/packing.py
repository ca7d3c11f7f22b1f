"""Trit packing for TernaryMatMul (layouts defined in docs/ops.md).

`2bit`:  4 trits a byte, trit k at bits 2*(k&3), codes 00→0, 01→+1, 10→−1.
`base3`: 5 trits a byte, byte = Σ (t_i + 1)·3^i.
"""

from __future__ import annotations

import numpy as np

PACKINGS = ("2bit", "base3")
TRITS_PER_BYTE = {"2bit": 4, "base3": 5}
BITS_PER_WEIGHT = {"2bit": 2.0, "base3": 8.0 / 5.0}


def packed_cols(k: int, packing: str) -> int:
    """Bytes per row for K trits."""
    if packing not in TRITS_PER_BYTE:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    per = TRITS_PER_BYTE[packing]
    return (k + per - 1) // per


def pack_trits(trits: np.ndarray, packing: str = "2bit") -> np.ndarray:
    """[N, K] int8 in {-1,0,1} → [N, Kb] uint8."""
    t = np.asarray(trits)
    if t.ndim != 2:
        raise ValueError(f"trits must be 2-D [N, K], got shape {t.shape}")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("trits must be in {-1, 0, +1}")
    n, k = t.shape
    kb = packed_cols(k, packing)
    per = TRITS_PER_BYTE[packing]
    if packing == "2bit":
        codes = np.zeros((n, kb * per), np.uint8)  # padding slots hold code 00 (zero)
        codes[:, :k] = np.where(t == 1, 1, np.where(t == -1, 2, 0)).astype(np.uint8)
        codes = codes.reshape(n, kb, per)
        return (codes << (2 * np.arange(per, dtype=np.uint8))).sum(-1, dtype=np.uint16).astype(np.uint8)
    digits = np.ones((n, kb * per), np.uint16)  # padding slots hold digit 1 (zero)
    digits[:, :k] = t.astype(np.int16) + 1
    digits = digits.reshape(n, kb, per)
    return (digits * (3 ** np.arange(per, dtype=np.uint16))).sum(-1).astype(np.uint8)


def unpack_trits(packed: np.ndarray, k: int, packing: str = "2bit") -> np.ndarray:
    """[N, Kb] uint8 → [N, K] int8; raises on invalid codes."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise ValueError(f"packed trits must be 2-D uint8, got {p.dtype} {p.shape}")
    kb = packed_cols(k, packing)
    if p.shape[1] != kb:
        raise ValueError(f"packed trits have {p.shape[1]} bytes a row, expected {kb} for K={k} ({packing})")
    per = TRITS_PER_BYTE[packing]
    if packing == "2bit":
        if np.any(p & (p >> 1) & 0x55):
            raise ValueError("invalid 2-bit trit code 11 in packed weights")
        codes = (p[..., None] >> (2 * np.arange(per, dtype=np.uint8))) & 3
        t = np.where(codes == 1, 1, np.where(codes == 2, -1, 0)).astype(np.int8)
    else:
        if np.any(p > 242):
            raise ValueError("invalid base-3 byte (> 242) in packed weights")
        digits = (p[..., None].astype(np.int16) // (3 ** np.arange(per, dtype=np.int16))) % 3
        t = (digits - 1).astype(np.int8)
    return t.reshape(p.shape[0], kb * per)[:, :k]
