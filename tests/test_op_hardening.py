"""The ai.bmoe ops with hostile attributes and angle files (issue 12): every case is one clean error,
never a hang, a crash, a read outside the model directory or a silently defaulted value.

The angle-file cases run in both backends (the C++ library through onnxruntime, and the Numba
runtime's AngleStream): one rule, docs/ops.md "angle_file: confined to the model directory".
custom_ops/run_sanitized_tests.sh runs this file under ASan/UBSan too.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bmoe_runtime.backends import numba_ops, ort_ops

from ops_reference import butterfly_rotate, stages, use_ort

ort = pytest.importorskip("onnxruntime")

MISSING = "libbmoe_ops.so is not built (pip install -e . or cmake -S custom_ops -B build)"
BACKENDS = ["ort", "numba"] if use_ort() else ["numba"]
HANG_S = 20  # a FIFO that blocked the open would never return: fail instead of hanging the suite

E, D = 6, 100  # the table: 6 experts, D = 100 → S = 7, P/2 = 64, float16
P, S = stages(D)
OFFSET = 128


def within(seconds: float, fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread; fails the test if it has not returned after `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s (a hang)", pytrace=False)
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------- helpers

def model(op, inputs, initializers=(), **attrs):
    """One ai.bmoe node; `inputs`: name → array (a graph input) or None (omitted)."""
    init = {t.name for t in initializers}
    names = [n if v is not None else "" for n, v in inputs.items()]
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                    for n, v in inputs.items() if v is not None and n not in init]
    node = helper.make_node(op, names, ["Y"], domain="ai.bmoe", **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.bmoe", 1)])


def ort_session(m, model_dir=None):
    if not ort_ops.available():
        pytest.fail(f"BMOE_REQUIRE_OPS=1 and {MISSING}", pytrace=False)
    so = ort.SessionOptions()
    ort_ops.register(so, model_dir)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_op(op, inputs, **attrs):
    sess = within(HANG_S, ort_session, model(op, inputs, **attrs))
    return sess.run(None, {n: v for n, v in inputs.items() if v is not None})[0]


@pytest.fixture()
def angles() -> np.ndarray:
    return np.random.default_rng(0).uniform(-3, 3, (E, S, P // 2)).astype(np.float16)


@pytest.fixture()
def model_dir(tmp_path, angles) -> Path:
    """A model directory holding angles.bin: OFFSET junk bytes, the table, 16 more."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "angles.bin").write_bytes(b"\x7f" * OFFSET + angles.tobytes() + b"\x7f" * 16)
    return d


def open_stream(backend, model_dir, file, size=None, experts=E, offset=OFFSET, slots=2, dtype=TensorProto.FLOAT16):
    """The streamed node's file opened by `backend`: an ORT session (returned) or a Numba AngleStream."""
    size = (Path(model_dir) / "angles.bin").stat().st_size if size is None else size
    if backend == "numba":
        return within(HANG_S, numba_ops.AngleStream, str(file), offset, experts, dtype, slots,
                      model_dir=None if model_dir is None else str(model_dir), file_size=size)
    m = model("ButterflyRotate", {"X": np.zeros((1, D), np.float32), "angles": None, "idx": np.zeros(1, np.int64)},
              angle_file=str(file), angle_file_size=size, angle_offset=offset, angle_experts=experts,
              angle_dtype=dtype, cache_slots=slots)
    return within(HANG_S, ort_session, m, model_dir)


def rotate(backend, stream, x, idx):
    if backend == "numba":
        return numba_ops.butterfly_rotate_streamed(x, stream, idx)
    return stream.run(None, {"X": x, "idx": idx})[0]


def refused(backend, match):
    return pytest.raises(numba_ops.OpError if backend == "numba" else Exception, match=f"ButterflyRotate: .*{match}")


# ------------------------------------------------------------------ angle_file confinement

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["angles.bin", "./angles.bin", "sub/../angles.bin", "ABSOLUTE"])
def test_angle_file_inside_the_model_directory_works(backend, model_dir, angles, name):
    (model_dir / "sub").mkdir()
    file = str(model_dir / "angles.bin") if name == "ABSOLUTE" else name
    stream = open_stream(backend, model_dir, file)
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    idx = np.array([0, 5, 2, 2, 1], np.int64)
    np.testing.assert_allclose(rotate(backend, stream, x, idx), butterfly_rotate(x, angles, idx, None), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifo_is_refused_without_blocking(backend, model_dir):
    os.mkfifo(model_dir / "fifo.bin")
    with refused(backend, "angle_file 'fifo.bin': 'fifo.bin' is a FIFO \\(must be a regular file\\)"):
        open_stream(backend, model_dir, "fifo.bin")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dev_zero_is_refused(backend, model_dir):
    with refused(backend, "angle_file '/dev/zero' is outside the model directory"):
        open_stream(backend, model_dir, "/dev/zero")
    # even where the model directory is /dev: a device is not a regular file
    with refused(backend, "angle_file 'zero': 'zero' is a character device"):
        open_stream(backend, "/dev", "zero", size=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["angles.bin", "/dev/zero", "/etc/passwd"])
def test_symlinked_angle_file_is_refused(backend, model_dir, target):
    (model_dir / "link.bin").symlink_to(target)  # even a link to the real file inside the directory
    with refused(backend, "angle_file 'link.bin': 'link.bin' is a symbolic link"):
        open_stream(backend, model_dir, "link.bin")


@pytest.mark.parametrize("backend", BACKENDS)
def test_symlinked_directory_is_refused(backend, model_dir, tmp_path):
    (model_dir / "sub").symlink_to(model_dir)  # inside, but a link: never followed
    with refused(backend, "angle_file 'sub/angles.bin': 'sub' is a symbolic link \\(must be a directory"):
        open_stream(backend, model_dir, "sub/angles.bin")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["../outside.bin", "sub/../../outside.bin", "..", "."])
def test_dotdot_out_of_the_model_directory_is_refused(backend, model_dir, tmp_path, name):
    (model_dir / "sub").mkdir()
    (tmp_path / "outside.bin").write_bytes((model_dir / "angles.bin").read_bytes())  # a valid table, outside
    with refused(backend, f"angle_file '{name}' leaves the model directory"):
        open_stream(backend, model_dir, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["/etc/passwd", "OUTSIDE", "DOTDOT"])
def test_absolute_path_outside_is_refused(backend, model_dir, tmp_path, name):
    (tmp_path / "outside.bin").write_bytes((model_dir / "angles.bin").read_bytes())
    file = {"OUTSIDE": str(tmp_path / "outside.bin"), "DOTDOT": f"{model_dir}/../outside.bin"}.get(name, name)
    with refused(backend, "is outside the model directory"):
        open_stream(backend, model_dir, file)


@pytest.mark.parametrize("backend", BACKENDS)
def test_directory_missing_file_and_unknown_model_dir_are_refused(backend, model_dir):
    (model_dir / "sub").mkdir()
    with refused(backend, "'sub' is a directory \\(must be a regular file\\)"):
        open_stream(backend, model_dir, "sub")
    with refused(backend, "cannot open angle_file 'nope.bin' \\('.*/model/nope.bin'\\): No such file"):
        open_stream(backend, model_dir, "nope.bin")
    if backend == "ort":  # the library learns the directory only from the session config
        with refused(backend, "the model directory is not known \\(set the session config entry bmoe.model_dir"):
            open_stream(backend, None, str(model_dir / "angles.bin"), size=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_file_size_must_match(backend, model_dir):
    size = (model_dir / "angles.bin").stat().st_size
    for declared in (size - 1, size + 1, 0, 2**62):
        with refused(backend, f"angle_file '.*angles.bin' has {size} bytes, attribute angle_file_size says {declared}"):
            open_stream(backend, model_dir, "angles.bin", size=declared)
    with refused(backend, "attribute angle_file_size is required with angle_file and must be >= 0|≥ 0"):
        open_stream(backend, model_dir, "angles.bin", size=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("experts", [10**12, 2**62, 2**63 - 1])
def test_huge_angle_experts_is_an_error_not_an_allocation(backend, model_dir, experts):
    with refused(backend, f"attribute angle_experts = {experts} does not fit in angle_file"):
        open_stream(backend, model_dir, "angles.bin", experts=experts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_beyond_the_file_fail_at_run_not_read_garbage(backend, model_dir):
    """Enough bytes for 2000 one-angle slices (so the node loads) but not for 2000 tables of D = 100."""
    stream = open_stream(backend, model_dir, "angles.bin", experts=2000)
    with refused(backend, "cannot hold angle_experts = 2000 slices of 896 bytes \\(S = 7\\)"):
        rotate(backend, stream, np.ones((1, D), np.float32), np.array([1999], np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [2**62, 2**63 - 1])
def test_huge_offset_is_an_error(backend, model_dir, offset):
    with refused(backend, "does not fit in angle_file"):
        open_stream(backend, model_dir, "angles.bin", offset=offset)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_cache_slots_are_harmless(backend, model_dir, angles):
    stream = open_stream(backend, model_dir, "angles.bin", slots=2**62)
    x = np.ones((2, D), np.float32)
    idx = np.array([4, 1], np.int64)
    np.testing.assert_allclose(rotate(backend, stream, x, idx), butterfly_rotate(x, angles, idx, None), atol=1e-4)


# ------------------------------------------------------------------- attribute types (ORT)

def _tmm(k=10):
    return {"A": np.ones((2, k), np.float32), "W": np.zeros((3, (k + 3) // 4), np.uint8), "s": np.ones(3, np.float32)}


def _rot():
    return {"X": np.ones((2, 6), np.float32), "angles": np.zeros((1, 3, 4), np.float32)}


def _streamed(model_dir):
    return dict(angle_file="angles.bin", angle_file_size=(model_dir / "angles.bin").stat().st_size,
                angle_offset=OFFSET, angle_experts=E, angle_dtype=TensorProto.FLOAT16, cache_slots=2)


WRONG_TYPES = [
    ("TernaryMatMul", dict(K=10.0), "attribute K must be an int, got a float \\(10.0\\)"),
    ("TernaryMatMul", dict(K="10"), "attribute K must be an int, got a string"),
    ("TernaryMatMul", dict(K=[10]), "attribute K must be an int, got a list of ints"),
    ("TernaryMatMul", dict(K=10, packing=3), "attribute packing must be a string, got an int \\(3\\)"),
    ("TernaryMatMul", dict(K=10, packing=2.0), "attribute packing must be a string, got a float"),
    ("TernaryMatMul", dict(K=10, act_quant=1.0), "attribute act_quant must be an int, got a float \\(1.0\\)"),
    ("TernaryMatMul", dict(K=10, act_quant=numpy_helper.from_array(np.ones(1, np.int64))),
     "attribute act_quant must be an int, got a tensor"),
    ("ButterflyRotate", dict(transpose=1.0), "attribute transpose must be an int, got a float \\(1.0\\)"),
    ("ButterflyRotate", dict(transpose=0.5), "attribute transpose must be an int, got a float \\(0.5\\)"),
    ("ButterflyRotate", dict(transpose="1"), "attribute transpose must be an int, got a string"),
    ("ButterflyRotate", dict(transpose=[1.0]), "attribute transpose must be an int, got a list of floats"),
    ("ButterflyRotate", dict(transpose=["1"]), "attribute transpose must be an int, got another type"),
    ("ButterflyRotate", dict(angle_file=5), "attribute angle_file must be a string, got an int \\(5\\)"),
    ("ButterflyRotate", dict(angle_file=""), "attribute angle_file must not be empty"),
]


@pytest.mark.parametrize("op, attrs, msg", WRONG_TYPES)
def test_wrong_attribute_types_are_errors(op, attrs, msg):
    with pytest.raises(Exception, match=f"{op}: {msg}"):
        run_op(op, _tmm() if op == "TernaryMatMul" else _rot(), **attrs)


STREAM_WRONG_TYPES = [
    (dict(angle_experts=6.0), "attribute angle_experts must be an int, got a float \\(6.0\\)"),
    (dict(angle_offset="128"), "attribute angle_offset must be an int, got a string"),
    (dict(angle_file_size=5504.0), "attribute angle_file_size must be an int, got a float"),
    (dict(angle_dtype=10.0), "attribute angle_dtype must be an int, got a float \\(10.0\\)"),
    (dict(angle_dtype=2**40), "attribute angle_dtype must be 1 \\(float32\\), 10 \\(float16\\) or 3 \\(int8\\)"),
    (dict(cache_slots=[2]), "attribute cache_slots must be an int, got a list of ints"),
    (dict(cache_key=7), "attribute cache_key must be a string, got an int \\(7\\)"),
    (dict(angle_experts=0), "attribute angle_experts is required with angle_file and must be >= 1, got 0"),
    (dict(angle_experts=-(2**63)), "attribute angle_experts is required with angle_file and must be >= 1, "
                                   "got -9223372036854775808"),
    (dict(cache_slots=-1), "attribute cache_slots is required with angle_file and must be >= 1, got -1"),
]


@pytest.mark.parametrize("attrs, msg", STREAM_WRONG_TYPES)
def test_streamed_attribute_types_and_ranges(model_dir, attrs, msg):
    inputs = {"X": np.ones((1, D), np.float32), "angles": None, "idx": np.zeros(1, np.int64)}
    with pytest.raises(Exception, match=f"ButterflyRotate: {msg}"):
        within(HANG_S, ort_session, model("ButterflyRotate", inputs, **{**_streamed(model_dir), **attrs}), model_dir)


def test_prefetch_attribute_types(model_dir):
    inputs = {"X": np.ones((1, 4), np.float32), "ids": np.zeros(1, np.int64)}
    for attrs, msg in [(dict(cache_key=1), "attribute cache_key must be a string, got an int"),
                       (dict(cache_key="k", angle_experts=10**12), "attribute angle_experts = 1000000000000 does not fit")]:
        with pytest.raises(Exception, match=f"AnglePrefetch: {msg}"):
            within(HANG_S, ort_session, model("AnglePrefetch", inputs, **{**_streamed(model_dir), **attrs}), model_dir)


# ------------------------------------------------------------------ sizes near the int64 limit

@pytest.mark.parametrize("k", [2**63 - 1, 2**63 - 4, 2**62, 2**24 + 1, 0, -1, -(2**63)])
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_ternary_k_out_of_range_is_an_error(k, packing):
    with pytest.raises(Exception, match=f"TernaryMatMul: attribute K must be in \\[1, 16777216\\], got {k}"):
        run_op("TernaryMatMul", _tmm(), K=k, packing=packing)


@pytest.mark.parametrize("packing, kb", [("2bit", 2**22), ("base3", (2**24 + 4) // 5)])
def test_ternary_largest_k_still_runs(packing, kb):
    """K = 2^24 (the limit) with M = 0 rows: shapes accepted, an empty [0, N] result."""
    inputs = {"A": np.zeros((0, 2**24), np.float32), "W": np.full((1, kb), 0 if packing == "2bit" else 121, np.uint8),
              "s": np.ones(1, np.float32)}
    assert run_op("TernaryMatMul", inputs, K=2**24, packing=packing).shape == (0, 1)


def test_butterfly_width_beyond_the_limit_is_an_error():
    inputs = {"X": np.zeros((0, 2**24 + 1), np.float32), "angles": np.zeros((1, 1, 1), np.float32)}
    with pytest.raises(Exception, match="ButterflyRotate: input X must have D <= 16777216 columns"):
        run_op("ButterflyRotate", inputs)
