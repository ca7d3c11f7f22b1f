"""Stream experts' butterfly angles from angles.bin on demand instead of loading them all.

`stream_angles` rewrites an exported model's ButterflyRotate nodes into their streamed
form (docs/ops.md, "ButterflyRotate, streamed form"): the node reads expert e's slice
of its [E, S, P/2] angle table from angles.bin with pread on a miss and keeps the
cos/sin tables of at most `cache_slots` experts (LRU). The angle initializers are
removed from the graph, so their bytes are never loaded. Both backends implement the
form: the C++ library (counters exported from libbmoe_ops.so) and numba_ops.

    from bmoe_runtime.session import ModelSession
    sess = ModelSession(model_dir, "ort", angle_cache_slots=2)   # every table: 2 experts cached
    sess = ModelSession(model_dir, "ort", angle_cache_slots={"lm.blocks.0.moe.experts.theta_angles": 4})
    cache_stats("ort")  # {'hits': ..., 'misses': ..., 'bytes_read': ...}
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import onnx

from . import numba_ops
from .errors import BmoeError

ANGLES_SUFFIX = "_angles"
_DTYPE_CODES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}


def _slots_for(slots: dict[str, int | None] | int, name: str, experts: int) -> int | None:
    """Cache slots for table `name`, or None to leave it resident (absent from a dict)."""
    n = slots.get(name) if isinstance(slots, dict) else slots
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BmoeError(f"angle cache slots for {name} must be an integer ≥ 1, got {n!r}")
    return min(n, experts)  # ≥ E: every expert stays cached once read (resident, loaded lazily)


def stream_angles(model: onnx.ModelProto, model_dir: Path, manifest: dict,
                  slots: dict[str, int | None] | int) -> onnx.ModelProto:
    """Rewrite, in place and returned, every ButterflyRotate whose angles input is a
    *_angles table in the model's angle file into the streamed form, and remove those
    initializers. `slots`: one count for every table, or {table name: count}; tables not
    in the dict (or mapped to None) stay resident. Counts ≥ E are clamped to E."""
    if isinstance(slots, dict):
        unknown = set(slots) - {t["tensor"] for t in manifest.get("angle_tables", [])}
        if unknown:
            raise BmoeError(f"angle cache slots given for unknown angle tables: {sorted(unknown)}")
    tensors = manifest.get("tensors", {})
    inits = {t.name: t for t in model.graph.initializer}
    streamed: set[str] = set()
    users: dict[str, int] = {}  # nodes per initializer (an initializer also read elsewhere stays)
    for node in model.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    for node in model.graph.node:
        if node.op_type != "ButterflyRotate" or len(node.input) < 2:
            continue
        name = node.input[1]
        info = tensors.get(name)
        if not name.endswith(ANGLES_SUFFIX) or name not in inits or info is None or info["kind"] != "angles":
            continue
        if info["dtype"] not in _DTYPE_CODES or len(info["shape"]) != 3:
            raise BmoeError(f"angle table {name} has dtype {info['dtype']} and shape {info['shape']}: cannot stream it")
        experts = int(info["shape"][0])
        n = _slots_for(slots, name, experts)
        if n is None:
            continue
        path = (Path(model_dir) / info["file"]).resolve()
        node.input[1] = ""
        node.attribute.extend([
            onnx.helper.make_attribute("angle_file", str(path)),
            onnx.helper.make_attribute("angle_offset", int(info["offset"])),
            onnx.helper.make_attribute("angle_experts", experts),
            onnx.helper.make_attribute("angle_dtype", _DTYPE_CODES[info["dtype"]]),
            onnx.helper.make_attribute("cache_slots", n),
        ])
        users[name] -= 1
        streamed.add(name)
    keep = [t for t in model.graph.initializer if t.name not in streamed or users.get(t.name, 0) > 0]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model


# ----------------------------------------------------------------------- counters

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _ort_lib() -> ctypes.CDLL:
    """libbmoe_ops.so through the same dlopen handle as onnxruntime's (same path), so the
    same global counters."""
    global _lib
    with _lib_lock:
        if _lib is None:
            from . import ort_ops

            path = ort_ops.library_path()
            if path is None:
                raise BmoeError(f"{ort_ops.LIB_NAME} is not built: no ort angle-cache counters")
            lib = ctypes.CDLL(str(path))
            u64p = ctypes.POINTER(ctypes.c_uint64)
            lib.BmoeAngleCacheStats.argtypes = [u64p, u64p, u64p]
            lib.BmoeAngleCacheStats.restype = None
            lib.BmoeAngleCacheReset.argtypes = []
            lib.BmoeAngleCacheReset.restype = None
            _lib = lib
        return _lib


def cache_stats(backend: str = "ort") -> dict[str, int]:
    """Process-wide totals of the streamed angle caches of `backend`: hits and misses
    ((call, expert) table look-ups) and angle bytes read from storage."""
    if backend == "numba":
        return numba_ops.angle_cache_stats()
    if backend != "ort":
        raise BmoeError(f"unknown backend {backend!r}")
    h, m, b = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
    _ort_lib().BmoeAngleCacheStats(ctypes.byref(h), ctypes.byref(m), ctypes.byref(b))
    return {"hits": h.value, "misses": m.value, "bytes_read": b.value}


def reset(backend: str = "ort") -> None:
    if backend == "numba":
        numba_ops.angle_cache_reset()
    elif backend == "ort":
        _ort_lib().BmoeAngleCacheReset()
    else:
        raise BmoeError(f"unknown backend {backend!r}")
