"""Stream experts' butterfly angles from angles.bin on demand instead of loading them all.

`stream_angles` rewrites an exported model's ButterflyRotate nodes into their streamed
form (docs/ops.md, "ButterflyRotate, streamed form"): the node reads expert e's slice
of its [E, S, P/2] angle table from angles.bin with pread on a miss and keeps the
cos/sin tables of at most `cache_slots` experts (LRU). The angle initializers are
removed from the graph, so their bytes are never loaded. Both backends implement the
form: the C++ library (counters exported from libbmoe_ops.so) and numba_ops.

    from bmoe_runtime.runtime.session import ModelSession
    sess = ModelSession(model_dir, "ort", angle_cache_slots=2)   # every table: 2 experts cached
    sess = ModelSession(model_dir, "ort", angle_cache_slots={"lm.blocks.0.moe.experts.theta_angles": 4})
    cache_stats("ort")  # {'hits': ..., 'misses': ..., 'bytes_read': ..., 'prefetches': ..., 'prefetch_hits': ...}

Router look-ahead (Pre-gated MoE; docs/ops.md, "AnglePrefetch"), `lookahead=True`: for each
MoE layer l+1 ≥ 1, layer l+1's router gate is also applied to the input of layer l's
router, its top-k experts go to AnglePrefetch nodes that load their angles into the caches
of layer l+1's streamed ButterflyRotate nodes (shared through a per-session cache_key), and
layer l's MoE input is passed through those nodes, so the prefetch runs before layer l's
experts (and so before layer l+1's). Tokens are unchanged; only what is cached differs.
"""

from __future__ import annotations

import ctypes
import heapq
import threading
import uuid
from pathlib import Path

import onnx


from bmoe_runtime.format import op_schemas
from bmoe_runtime.errors import BmoeError

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
                  slots: dict[str, int | None] | int, lookahead: bool = False) -> onnx.ModelProto:
    """Rewrite, in place and returned, every ButterflyRotate whose angles input is a
    *_angles table in the model's angle file into the streamed form, and remove those
    initializers. `slots`: one count for every table, or {table name: count}; tables not
    in the dict (or mapped to None) stay resident. Counts ≥ E are clamped to E.
    `lookahead`: also add the router look-ahead prefetch (add_lookahead)."""
    if isinstance(slots, dict):
        unknown = set(slots) - {t["tensor"] for t in manifest.get("angle_tables", [])}
        if unknown:
            raise BmoeError(f"angle cache slots given for unknown angle tables: {sorted(unknown)}")
    tensors = manifest.get("tensors", {})
    inits = {t.name: t for t in model.graph.initializer}
    streamed: set[str] = set()
    nodes_of: dict[str, list[onnx.NodeProto]] = {}  # streamed table → its rotate nodes
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
        # Relative to the model directory, to which both backends confine it (docs/ops.md).
        file_size = manifest.get("files", {}).get(info["file"], {}).get("bytes")
        if not isinstance(file_size, int):
            raise BmoeError(f"the manifest lists no size for {info['file']}: cannot stream angle table {name}")
        node.input[1] = ""
        node.attribute.extend([
            onnx.helper.make_attribute("angle_file", str(info["file"])),
            onnx.helper.make_attribute("angle_file_size", file_size),
            onnx.helper.make_attribute("angle_offset", int(info["offset"])),
            onnx.helper.make_attribute("angle_experts", experts),
            onnx.helper.make_attribute("angle_dtype", _DTYPE_CODES[info["dtype"]]),
            onnx.helper.make_attribute("cache_slots", n),
        ])
        users[name] -= 1
        streamed.add(name)
        nodes_of.setdefault(name, []).append(node)
    keep = [t for t in model.graph.initializer if t.name not in streamed or users.get(t.name, 0) > 0]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    if lookahead:
        add_lookahead(model, nodes_of)
    return model


GATE_SUFFIX = "router.gate.weight"
LOOKAHEAD_META = "bmoe.lookahead_layers"


def add_lookahead(model: onnx.ModelProto, nodes_of: dict[str, list[onnx.NodeProto]]) -> int:
    """Router look-ahead prefetch, in place; returns the number of layers served (also in the
    model's metadata_props[LOOKAHEAD_META]). `nodes_of`: streamed table → its streamed
    ButterflyRotate nodes. Router gates are the MatMul/Gemm nodes reading a
    `<layer>.router.gate.weight` initializer, in graph (= execution) order, each feeding a
    TopK directly; a layer's tables are the streamed ones named `<layer>...`. For gate i ≥ 1
    whose layer has streamed tables: Gemm_i(x_{i-1}) → TopK(k_i) → AnglePrefetch per table,
    chained on x_{i-1} (the input of gate i-1), whose every other consumer then reads the
    chain's output instead. The caches of a served table's rotate nodes get a cache_key
    unique to this rewrite, so only this session's nodes share them."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    gates = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2
             and n.input[1].endswith(GATE_SUFFIX)]
    token = uuid.uuid4().hex
    added: list[onnx.NodeProto] = []
    served = 0
    for i in range(1, len(gates)):
        gate, prev = gates[i], gates[i - 1]
        layer = gate.input[1][: -len(GATE_SUFFIX)]
        tables = [t for t in nodes_of if t.startswith(layer)]
        topk = [n for n in graph.node if n.op_type == "TopK" and n.input and n.input[0] == gate.output[0]]
        if not tables or len(topk) != 1 or len(topk[0].input) < 2 or len(topk[0].output) < 2:
            continue
        x = prev.input[0]
        consumers = [n for n in graph.node if x in n.input]
        tag = f"bmoe_lookahead_{i}"
        new = []
        g = onnx.NodeProto()
        g.CopyFrom(gate)
        g.input[0] = x
        del g.output[:]
        g.output.append(f"{tag}_logits")
        g.name = f"{tag}_gate"
        t = onnx.NodeProto()
        t.CopyFrom(topk[0])
        t.input[0] = g.output[0]
        del t.output[:]
        t.output.extend([f"{tag}_values", f"{tag}_ids"])
        t.name = f"{tag}_topk"
        new += [g, t]
        cur = x
        for j, table in enumerate(sorted(tables)):
            rot = nodes_of[table][0]
            key = f"{token}/{table}"
            for r in nodes_of[table]:
                r.attribute.append(onnx.helper.make_attribute("cache_key", key))
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in rot.attribute
                     if a.name in ("angle_file", "angle_file_size", "angle_offset", "angle_experts", "angle_dtype",
                                   "cache_slots")}
            scale = rot.input[3] if len(rot.input) > 3 and rot.input[3] else None
            out = f"{tag}_x{j}"
            new.append(onnx.helper.make_node(
                "AnglePrefetch", [cur, t.output[1]] + ([scale] if scale else []), [out], name=f"{tag}_prefetch{j}",
                domain=op_schemas.DOMAIN, cache_key=key, **attrs))
            cur = out
        for n in consumers:
            for k, name in enumerate(n.input):
                if name == x:
                    n.input[k] = cur
        added += new
        served += 1
    if added:
        nodes = list(graph.node)
        # New nodes right after x's producer (ties broken by that position), then a stable topological sort.
        pos = {id(n): float(k) for k, n in enumerate(nodes)}
        for k, n in enumerate(added):
            src = producer.get(n.input[0]) if n.op_type != "TopK" else None
            pos[id(n)] = (pos[id(src)] if src is not None and id(src) in pos else -1.0) + 0.5 + k * 1e-6
        ordered = _topo_sort(nodes + added, pos, graph)
        del graph.node[:]
        graph.node.extend(ordered)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        LOOKAHEAD_META: str(served)})
    return served


def _topo_sort(nodes: list[onnx.NodeProto], pos: dict[int, float], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's algorithm, ready nodes taken in `pos` order (the original order where it is valid)."""
    produced = {o: n for n in nodes for o in n.output if o}
    deps = {id(n): {id(produced[i]) for i in n.input if i in produced and produced[i] is not n} for n in nodes}
    users: dict[int, list[onnx.NodeProto]] = {}
    for n in nodes:
        for d in deps[id(n)]:
            users.setdefault(d, []).append(n)
    heap = [(pos[id(n)], k, n) for k, n in enumerate(nodes) if not deps[id(n)]]
    index = {id(n): k for k, n in enumerate(nodes)}
    heapq.heapify(heap)
    out = []
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for u in users.get(id(n), []):
            deps[id(u)].discard(id(n))
            if not deps[id(u)]:
                heapq.heappush(heap, (pos[id(u)], index[id(u)], u))
    if len(out) != len(nodes):
        raise BmoeError("lookahead rewrite made the graph cyclic")  # cannot happen: new nodes only read earlier values
    return out


# ----------------------------------------------------------------------- counters

_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _ort_lib() -> ctypes.CDLL:
    """libbmoe_ops.so through the same dlopen handle as onnxruntime's (same path), so the
    same global counters."""
    global _lib
    with _lib_lock:
        if _lib is None:
            from bmoe_runtime.backends import ort_ops

            path = ort_ops.library_path()
            if path is None:
                raise BmoeError(f"{ort_ops.LIB_NAME} is not built: no ort angle-cache counters")
            lib = ctypes.CDLL(str(path))
            u64p = ctypes.POINTER(ctypes.c_uint64)
            lib.BmoeAngleCacheStats.argtypes = [u64p, u64p, u64p]
            lib.BmoeAngleCacheStats.restype = None
            lib.BmoeAnglePrefetchStats.argtypes = [u64p, u64p]
            lib.BmoeAnglePrefetchStats.restype = None
            lib.BmoeAngleCacheReset.argtypes = []
            lib.BmoeAngleCacheReset.restype = None
            _lib = lib
        return _lib


def cache_stats(backend: str = "ort") -> dict[str, int]:
    """Process-wide totals of the streamed angle caches of `backend`: hits and misses
    ((call, expert) table look-ups by ButterflyRotate), angle bytes read from storage (misses'
    and prefetches'), prefetches (experts read by AnglePrefetch) and prefetch_hits (hits on an
    entry a prefetch brought in, counted on its first hit)."""
    if backend == "numba":
        from bmoe_runtime.backends import numba_ops

        return numba_ops.angle_cache_stats()
    if backend != "ort":
        raise BmoeError(f"unknown backend {backend!r}")
    h, m, b, p, ph = (ctypes.c_uint64() for _ in range(5))
    lib = _ort_lib()
    lib.BmoeAngleCacheStats(ctypes.byref(h), ctypes.byref(m), ctypes.byref(b))
    lib.BmoeAnglePrefetchStats(ctypes.byref(p), ctypes.byref(ph))
    return {"hits": h.value, "misses": m.value, "bytes_read": b.value, "prefetches": p.value, "prefetch_hits": ph.value}


def reset(backend: str = "ort") -> None:
    if backend == "numba":
        from bmoe_runtime.backends import numba_ops

        numba_ops.angle_cache_reset()
    elif backend == "ort":
        _ort_lib().BmoeAngleCacheReset()
    else:
        raise BmoeError(f"unknown backend {backend!r}")
