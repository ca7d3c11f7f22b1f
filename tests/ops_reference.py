"""Independent numpy references for the ai.bmoe operators (docs/ops.md)."""

from __future__ import annotations

import numpy as np

from bmoe_runtime.format.packing import unpack_trits


def stages(d: int) -> tuple[int, int]:
    """(P, S): padded size and number of butterfly stages for width d."""
    s = max(1, int(np.ceil(np.log2(d))))
    return 1 << s, s


def dequantize_angles(angles: np.ndarray, angle_scale: np.ndarray | None) -> np.ndarray:
    if angles.dtype == np.int8:
        return angles.astype(np.float32) * angle_scale.astype(np.float32)[:, None, None]
    return angles.astype(np.float32)


_MATRICES: dict = {}


def butterfly_matrix(theta: np.ndarray, d: int, transpose: bool = False) -> np.ndarray:
    key = (theta.tobytes(), theta.shape, d)
    if key not in _MATRICES:  # tests reuse the same angles for every kernel variant
        _MATRICES[key] = _butterfly_matrix(theta, d)
    return _MATRICES[key].T if transpose else _MATRICES[key]


def _butterfly_matrix(theta: np.ndarray, d: int) -> np.ndarray:
    """Dense [d, d] matrix of B(θ) (or Bᵀ) = G_{S-1} ⋯ G_0, float64.

    Each G_s is the block of Givens rotations of stage s; G_s · B only mixes rows j
    and j+h of B, so the product is formed row-pair-wise instead of as a dense matmul.
    """
    p, s_count = stages(d)
    b = np.eye(p)
    k = np.arange(p // 2)
    for s in range(s_count):
        h = 1 << s
        j = (k >> s) << (s + 1) | (k & (h - 1))
        live = j + h < d  # pairs reaching into the padding are the identity
        jj, c, sn = j[live], np.cos(theta[s, live].astype(np.float64)), np.sin(theta[s, live].astype(np.float64))
        lo, hi = b[jj].copy(), b[jj + h].copy()
        b[jj] = c[:, None] * lo - sn[:, None] * hi
        b[jj + h] = sn[:, None] * lo + c[:, None] * hi
    return b[:d, :d]


def butterfly_rotate(x, angles, expert_index=None, angle_scale=None, transpose=False) -> np.ndarray:
    theta = dequantize_angles(angles, angle_scale)
    idx = np.zeros(len(x), np.int64) if expert_index is None else expert_index
    y = np.empty(x.shape, np.float64)
    for e in np.unique(idx):
        y[idx == e] = x[idx == e].astype(np.float64) @ butterfly_matrix(theta[e], x.shape[1], transpose).T
    return y


def quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """act_quant=1 activations: (q int32 [M, K], s float32 [M]); s = 0 for all-zero rows."""
    amax = np.abs(a).max(axis=1) if a.size else np.zeros(len(a), np.float32)
    s = (amax / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1))
    x = (a / safe[:, None]).astype(np.float32).astype(np.float64)
    q = np.clip(np.sign(x) * np.floor(np.abs(x) + 0.5), -127, 127).astype(np.int32)
    return np.where(s[:, None] > 0, q, 0), s


def ternary_matmul(a, w_packed, scale, k, packing="2bit", act_quant=0) -> np.ndarray:
    t = unpack_trits(w_packed, k, packing).astype(np.int64)
    if not act_quant:
        return (a.astype(np.float64) @ t.T) * scale.astype(np.float64)
    q, s = quantize_rows(a)
    acc = q.astype(np.int64) @ t.T  # exact
    return s.astype(np.float64)[:, None] * scale.astype(np.float64) * acc


# ------------------------------------------------------------ what CI requires of the op library

def ops_required() -> bool:
    """BMOE_REQUIRE_OPS=1 (set by .ci/run): a missing libbmoe_ops.so fails the op tests instead of skipping them."""
    import os

    return os.environ.get("BMOE_REQUIRE_OPS") == "1"


def use_ort() -> bool:
    """Whether a test's ONNX Runtime branch runs: when the library is built, and always under BMOE_REQUIRE_OPS=1
    (where a missing library then fails that branch instead of skipping it)."""
    from bmoe_runtime.backends import ort_ops

    return ort_ops.available() or ops_required()


def cpu_variants() -> list[str]:
    """The kernel variants this CPU supports, read from /proc/cpuinfo (independently of the library,
    whose own detection is what is under test): every one of them must run."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    machine = platform.machine().lower()
    found = ["scalar"]
    if machine in ("x86_64", "amd64"):
        if {"avx2", "fma"} <= flags:
            found.append("avx2")
            if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
                found.append("avx512")
    elif machine in ("aarch64", "arm64"):
        found.append("neon")  # mandatory on AArch64
        if "asimddp" in flags:
            found.append("dotprod")
    return found
