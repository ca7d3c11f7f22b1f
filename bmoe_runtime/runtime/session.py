"""Run an exported model directory: one interface, two backends.

  ort    ONNX Runtime with the C++ ai.bmoe library (custom_ops/): the fast path
  numba  onnx's ReferenceEvaluator for standard ops + numba_ops for ai.bmoe: the readable
         reference, and the fallback where the C++ library is not available

The manifest's checksums are verified before any weights are loaded. With
angle_cache_slots, experts' angles are streamed from angles.bin (streaming.py).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data  # every tensor, subgraphs too

from bmoe_runtime.backends import contrib_ops

from bmoe_runtime.format import op_schemas
from bmoe_runtime.errors import BmoeError, OpError, require_numba
from bmoe_runtime.format import untrusted
from bmoe_runtime.format.genai_config import PADDING_INPUTS
from bmoe_runtime.format.manifest import read_manifest, read_verified
from bmoe_runtime.runtime.planned_dir import check_streamed_graph, streamed_slots

BACKENDS = ("ort", "numba")
MAX_GRAPH_BYTES = 2**30  # model.onnx without its weights (they are in external files)
_NP_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}


def _reference_ops(model_dir: Path):
    """The ai.bmoe ops for onnx's ReferenceEvaluator; streamed angle files are confined to model_dir."""
    from onnx.reference.op_run import OpRun

    from bmoe_runtime.backends import numba_ops  # needs numba

    class ButterflyRotate(OpRun):
        op_domain = op_schemas.DOMAIN

        def __init__(self, onnx_node, run_params, schema=None):
            super().__init__(onnx_node, run_params, schema)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in onnx_node.attribute}
            self._stream = None
            if attrs.get("angle_file"):  # streamed form: the file is opened once, with the node
                self._stream = numba_ops.AngleStream.shared(
                    attrs.get("cache_key", b"").decode(), attrs["angle_file"].decode(), attrs.get("angle_offset", 0),
                    attrs.get("angle_experts"), attrs.get("angle_dtype"), attrs.get("cache_slots"),
                    model_dir=str(model_dir), file_size=attrs.get("angle_file_size", -1))

        def _run(self, x, angles=None, expert_index=None, angle_scale=None, transpose=0, **streamed):
            if self._stream is not None:
                if angles is not None:
                    raise OpError("ButterflyRotate: input angles must be omitted when angle_file is set")
                return (numba_ops.butterfly_rotate_streamed(x, self._stream, expert_index, angle_scale,
                                                            int(transpose)),)
            if angles is None:
                raise OpError("ButterflyRotate: input angles is required (or the attribute angle_file)")
            return (numba_ops.butterfly_rotate(x, angles, expert_index, angle_scale, int(transpose)),)

    class AnglePrefetch(OpRun):
        op_domain = op_schemas.DOMAIN

        def __init__(self, onnx_node, run_params, schema=None):
            super().__init__(onnx_node, run_params, schema)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in onnx_node.attribute}
            key = attrs.get("cache_key", b"").decode()
            if not key or not attrs.get("angle_file"):
                raise OpError("AnglePrefetch: attributes angle_file and cache_key are required")
            self._stream = numba_ops.AngleStream.shared(
                key, attrs["angle_file"].decode(), attrs.get("angle_offset", 0), attrs.get("angle_experts"),
                attrs.get("angle_dtype"), attrs.get("cache_slots"), op="AnglePrefetch",
                model_dir=str(model_dir), file_size=attrs.get("angle_file_size", -1))

        def _run(self, x, expert_ids, angle_scale=None, **attrs):
            return (numba_ops.angle_prefetch(x, expert_ids, self._stream, angle_scale),)

    class TernaryMatMul(OpRun):
        op_domain = op_schemas.DOMAIN

        def _run(self, a, w_packed, scale, K=None, packing="2bit", act_quant=0):  # noqa: N803 (ONNX attribute name)
            packing = packing.decode() if isinstance(packing, bytes) else packing
            return (numba_ops.ternary_matmul(a, w_packed, scale, K, packing, int(act_quant)),)

    class MatMulNBits(OpRun):  # com.microsoft: the int4/int8 weights of a compressed export
        op_domain = contrib_ops.DOMAIN

        def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, **attrs):
            return (contrib_ops.matmul_nbits(a, b, scales, zero_points, g_idx, bias, **attrs),)

    class GatherBlockQuantized(OpRun):  # com.microsoft: the int4/int8 embedding lookups
        op_domain = contrib_ops.DOMAIN

        def _run(self, data, indices, scales, zero_points=None, **attrs):
            return (contrib_ops.gather_block_quantized(data, indices, scales, zero_points, **attrs),)

    return [ButterflyRotate, TernaryMatMul, AnglePrefetch, MatMulNBits, GatherBlockQuantized]


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class ModelSession:
    """A loaded exported model. `run` is safe to call from several threads."""

    def __init__(self, model_dir: str | Path, backend: str = "ort", threads: int | None = None, verify: bool = True,
                 angle_cache_slots: int | dict[str, int | None] | None = None, lookahead: bool = False):
        """lookahead: router look-ahead prefetch of streamed angles (streaming.add_lookahead);
        needs angle_cache_slots."""
        if backend not in BACKENDS:
            raise BmoeError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir, verify=verify)
        self.backend = backend
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BmoeError(f"threads must be a whole number ≥ 1, got {threads!r}")
        threads = min(threads, available_cores()) if threads else threads  # more only oversubscribe (and stall)
        path = str(self.dir / self.manifest["model"])
        proto = self._load_graph(verify)
        graph_inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
        # attention_mask/position_ids (GenAI's padding inputs) are optional here: run() fills them in unpadded
        self.padding_inputs = {n: t for n, t in graph_inputs.items() if n in PADDING_INPUTS}
        self.inputs = {n: t for n, t in graph_inputs.items() if n not in PADDING_INPUTS}
        self.output_names = [o.name for o in proto.graph.output]
        streamed = None
        if lookahead and angle_cache_slots is None:
            raise BmoeError("lookahead prefetch needs streamed angles (angle_cache_slots)")
        if angle_cache_slots is not None and streamed_slots(self.manifest):
            raise BmoeError(f"{self.dir} is a planned directory (bmoe plan --write): its angles already stream "
                            "from the file with the plan's cache; load it without angle cache slots")
        if angle_cache_slots is not None:  # angles streamed: the rewritten graph, without their initializers
            from bmoe_runtime.runtime.streaming import stream_angles

            streamed = stream_angles(proto, self.dir, self.manifest, angle_cache_slots, lookahead=lookahead)
        # MoE layers served by the router look-ahead prefetch (0 without it)
        self.lookahead_layers = int({p.key: p.value for p in (streamed or proto).metadata_props}
                                    .get("bmoe.lookahead_layers", 0))
        if backend == "ort":  # from the verified bytes, never re-read from the path
            self._impl, self._lock = self._ort_session(path, threads, streamed or proto), None
        else:
            self._impl, self._lock = self._reference_session(path, threads, streamed or proto), threading.Lock()

    def _load_graph(self, verify: bool | str) -> onnx.ModelProto:
        """model.onnx read once (size and sha256 checked unless verify is off), its external data confined
        to the tensors the manifest lists: same file, offset, length and shape."""
        m, name = self.manifest, self.manifest["model"]
        data = (untrusted.read_bounded(self.dir / name, MAX_GRAPH_BYTES, "model") if verify in (False, "none")
                else read_verified(self.dir, m, name, MAX_GRAPH_BYTES))
        try:
            proto = onnx.load_from_string(data)
        except Exception as exc:  # protobuf raises its own DecodeError
            raise BmoeError(f"{self.dir / name} is not a readable ONNX model: {_first_line(exc)}") from None
        listed, seen = m["tensors"], set()
        for t in _get_all_tensors(proto):
            if not uses_external_data(t):
                continue
            ext = {e.key: e.value for e in t.external_data}
            want = listed.get(t.name)
            if want is None or t.name in seen or (ext.get("location"), ext.get("offset"), ext.get("length")) != \
                    (want["file"], str(want["offset"]), str(want["bytes"])) or list(t.dims) != want["shape"]:
                raise BmoeError(f"{self.dir / name}: external tensor {t.name[:80]!r} does not match the manifest")
            seen.add(t.name)
        streamed = streamed_slots(m)  # a planned directory's streamed tables are read by its nodes instead
        if seen != set(listed) - set(streamed):
            raise BmoeError(f"{self.dir / name}: the graph's external tensors are not the manifest's, e.g. "
                            f"{sorted(seen ^ (set(listed) - set(streamed)))[0][:80]!r}")
        if streamed:
            check_streamed_graph(proto, m, str(self.dir / name))
        return proto

    @staticmethod
    def _ort_session(path: str, threads: int | None, model: onnx.ModelProto | None = None):
        import onnxruntime as ort

        from bmoe_runtime.backends import ort_ops

        opts = ort.SessionOptions()
        try:
            ort_ops.register(opts, model_dir=Path(path).parent)  # streamed angle files are confined to it
        except Exception as exc:  # not found, or not a loadable op library ($BMOE_OPS_LIB)
            raise BmoeError(f"the ai.bmoe op library cannot be loaded: {_first_line(exc)}") from None
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if model is not None:  # from bytes: external data is found relative to the model's directory
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(Path(path).parent))
        try:
            source = path if model is None else model.SerializeToString()
            return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT reports a bad model as a generic exception type
            raise BmoeError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from None

    @staticmethod
    def _reference_session(path: str, threads: int | None, model: onnx.ModelProto | None = None):
        from onnx.reference import ReferenceEvaluator

        require_numba()
        if threads:
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        op_schemas.register()
        try:
            if model is None:
                model = onnx.load(path)  # with external data
            else:
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(model, str(Path(path).parent))
            onnx.checker.check_model(model)
        except Exception as exc:
            raise BmoeError(f"{path} cannot be loaded: {str(exc).splitlines()[0][:300]}") from None
        try:
            return ReferenceEvaluator(model, new_ops=_reference_ops(Path(path).parent))
        except OpError as exc:  # a streamed node's angle_file cannot be opened
            raise BmoeError(str(exc)) from None

    def with_padding_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """feeds plus the graph's attention_mask (all ones) and position_ids (after the past) where the caller
        gave neither: an unpadded batch, as graphs without those inputs run it."""
        given = set(self.padding_inputs) & set(feeds)
        if given:
            if given != set(self.padding_inputs):
                raise BmoeError(f"give the model's {' and '.join(self.padding_inputs)} together, or neither")
            return feeds
        if not self.padding_inputs:
            return feeds
        b, t, p = feeds["input_ids"].shape[0], feeds["input_ids"].shape[1], feeds["past_key_0"].shape[2]
        defaults = {"attention_mask": np.ones((b, p + t), np.int64),
                    "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)).copy()}
        return {**feeds, **{n: defaults[n] for n in self.padding_inputs}}

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Names, dtypes and ranks against the graph's inputs, before anything runs."""
        inputs = {**self.inputs, **{n: t for n, t in self.padding_inputs.items() if n in feeds}}
        missing = set(inputs) - set(feeds)
        extra = set(feeds) - set(inputs)
        if missing or extra:
            raise BmoeError(f"inputs do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, t in inputs.items():
            v = feeds[name]
            want = _NP_DTYPES.get(t.elem_type)
            if not isinstance(v, np.ndarray) or (want is not None and v.dtype != want):
                got = v.dtype if isinstance(v, np.ndarray) else type(v).__name__
                raise BmoeError(f"input {name!r} must be a {np.dtype(want).name} array, got {got}")
            dims = t.shape.dim
            if v.ndim != len(dims):
                raise BmoeError(f"input {name!r} must have rank {len(dims)}, got shape {v.shape}")
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value") and v.shape[axis] != dim.dim_value:
                    raise BmoeError(f"input {name!r} axis {axis} must be {dim.dim_value}, got shape {v.shape}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        feeds = self.with_padding_inputs(feeds)
        try:
            if self._lock is None:
                values = self._impl.run(None, feeds)
            else:
                with self._lock:  # the reference evaluator keeps per-run state
                    values = self._impl.run(None, feeds)
        except OpError as exc:
            raise BmoeError(str(exc)) from None
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                raise BmoeError(f"ONNX Runtime: {_first_line(exc)}") from None
            if self._lock is not None:  # the reference evaluator reports a bad graph with numpy's errors
                raise BmoeError(f"the numba runtime cannot run this model: {type(exc).__name__}: "
                                f"{_first_line(exc)}") from None
            raise
        return dict(zip(self.output_names, values))
