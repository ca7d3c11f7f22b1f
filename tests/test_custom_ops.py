"""onnxruntime + libbmoe_ops against the numpy references (docs/ops.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bmoe_runtime.backends import ort_ops  # noqa: E402
from bmoe_runtime.errors import BmoeError  # noqa: E402
from bmoe_runtime.format.packing import pack_trits  # noqa: E402

from ops_reference import butterfly_rotate, cpu_variants, ops_required, stages, ternary_matmul  # noqa: E402

MISSING = "libbmoe_ops.so is not built (pip install -e . or cmake -S custom_ops -B build)"
if not ort_ops.available() and not ops_required():
    pytest.skip(MISSING, allow_module_level=True)


@pytest.fixture(autouse=True)
def _library_present():
    """With BMOE_REQUIRE_OPS=1 every test here fails, naming the cause, when the library is missing."""
    if not ort_ops.available():
        pytest.fail(f"BMOE_REQUIRE_OPS=1 and {MISSING}; BMOE_OPS_LIB={__import__('os').environ.get('BMOE_OPS_LIB')}",
                    pytrace=False)


ALL_VARIANTS = ("scalar", "avx2", "avx512", "neon", "dotprod")


# ---------------------------------------------------------------------------- helpers

def make_model(op, inputs, outputs=("Y",), initializers=(), **attrs):
    """One ai.bmoe node; `inputs` maps name → array (a graph input) or None (omitted)."""
    init_names = {t.name for t in initializers}
    names = [n if v is not None else "" for n, v in inputs.items()]
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), None)
                    for n, v in inputs.items() if v is not None and n not in init_names]
    node = helper.make_node(op, names, list(outputs), domain="ai.bmoe", **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.bmoe", 1)])


def session(model, threads=1, model_dir=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    ort_ops.register(so, model_dir)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(op, inputs, const=(), threads=1, **attrs):
    inits = [numpy_helper.from_array(inputs[n], n) for n in const]
    sess = session(make_model(op, inputs, initializers=inits, **attrs), threads)
    feeds = {n: v for n, v in inputs.items() if v is not None and n not in const}
    return sess.run(None, feeds)[0]


# Every variant the CPU supports (by /proc/cpuinfo, not by asking the library): one that fails
# to run fails its tests, it is never dropped.
VARIANTS = cpu_variants()


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Forces each kernel variant this CPU supports (read at kernel creation)."""
    monkeypatch.setenv("BMOE_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_library_detects_the_cpu_variants(monkeypatch, name):
    """The library runs exactly the variants the CPU has and refuses the others by name."""
    monkeypatch.setenv("BMOE_KERNEL", name)
    a, w, s = np.ones((1, 4), np.float32), pack_trits(np.ones((1, 4), np.int8)), np.ones(1, np.float32)
    if name in VARIANTS:
        np.testing.assert_array_equal(run("TernaryMatMul", {"A": a, "W": w, "s": s}, K=4), [[4.0]])
    else:
        with pytest.raises(Exception, match=f"BMOE_KERNEL={name} is not available on this CPU"):
            run("TernaryMatMul", {"A": a, "W": w, "s": s}, K=4)


# ---------------------------------------------------------------------- TernaryMatMul

TMM_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 64, 16), (5, 100, 33), (16, 129, 9), (9, 300, 65), (1, 4096, 40),
              (0, 10, 4), (13, 768, 18)]


def tmm_case(rng, m, k, n, packing):
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    a = rng.standard_normal((m, k)).astype(np.float32)
    if m > 2:
        a[1] = 0  # all-zero row (act_quant special case)
    return a, pack_trits(t, packing), (rng.random(n) + 0.5).astype(np.float32)


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("act_quant", [0, 1])
def test_ternary_matmul(variant, packing, act_quant):
    rng = np.random.default_rng(1)
    for i, (m, k, n) in enumerate(TMM_SHAPES):
        a, w, s = tmm_case(rng, m, k, n, packing)
        inputs = {"A": a, "W": w, "s": s}
        y = run("TernaryMatMul", inputs, const=("W", "s") if i % 2 else (), threads=1 + i % 2,
                K=k, packing=packing, act_quant=act_quant)
        ref = ternary_matmul(a, w, s, k, packing, act_quant)
        assert y.shape == (m, n) and y.dtype == np.float32
        if act_quant:
            np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-30, err_msg=f"{(m, k, n)}")
        else:
            tol = 1e-5 * (1 + np.abs(a).sum(1, keepdims=True)) * np.abs(s)
            assert np.all(np.abs(y - ref) <= tol), f"{(m, k, n)} max err {np.abs(y - ref).max()}"


# Shapes that reach each fp32 path: M ≤ 4 with a constant W uses the repacked lookup-table
# path (K blocks of 576, 16-row groups, 1024-row task blocks), M ≥ 3 the GEMM micro-kernel
# (32-row panels, 128-trit K blocks, 8-row A blocks), both with ragged edges.
TMM_KERNEL_SHAPES = [(1, 1, 1), (1, 17, 15), (2, 19, 17), (4, 599, 33), (1, 1300, 1030), (3, 130, 31),
                     (8, 131, 32), (12, 257, 65), (21, 700, 97), (4, 3, 2)]


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("const_w", [False, True])
def test_ternary_matmul_fp32_kernels(variant, packing, const_w):
    rng = np.random.default_rng(11)
    for m, k, n in TMM_KERNEL_SHAPES:
        a, w, s = tmm_case(rng, m, k, n, packing)
        y = run("TernaryMatMul", {"A": a, "W": w, "s": s}, const=("W",) if const_w else (), K=k, packing=packing)
        ref = ternary_matmul(a, w, s, k, packing, 0)
        tol = 1e-5 * (1 + np.abs(a).sum(1, keepdims=True)) * np.abs(s)
        assert np.all(np.abs(y - ref) <= tol), f"{(m, k, n)} max err {np.abs(y - ref).max()}"


@pytest.mark.parametrize("packing", ["2bit", "base3"])
@pytest.mark.parametrize("m", [0, 1, 4, 9])
@pytest.mark.parametrize("act_quant", [0, 1])
def test_ternary_matmul_invalid_code_in_constant_w(variant, packing, m, act_quant):
    w = _bad_code(packing)
    inputs = {"A": np.ones((m, 10), np.float32), "W": w, "s": np.ones(4, np.float32)}
    with pytest.raises(Exception, match="invalid 2-bit trit code" if packing == "2bit" else "invalid base3 byte"):
        run("TernaryMatMul", inputs, const=("W",), K=10, packing=packing, act_quant=act_quant)
    # a code 11 in the padding slots of a row's last byte is reported too
    if packing == "2bit":
        w = pack_trits(np.zeros((4, 10), np.int8))
        w[3, -1] = 0b11 << 6
        with pytest.raises(Exception, match="invalid 2-bit trit code"):
            run("TernaryMatMul", {**inputs, "W": w}, const=("W",), K=10, act_quant=act_quant)


def test_ternary_matmul_default_packing_is_2bit():
    rng = np.random.default_rng(2)
    a, w, s = tmm_case(rng, 4, 37, 5, "2bit")
    y = run("TernaryMatMul", {"A": a, "W": w, "s": s}, K=37)
    np.testing.assert_allclose(y, ternary_matmul(a, w, s, 37), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------- ButterflyRotate

# The slab partition and the prefill GEMM: several 256-row LUT slabs with a partial last one, K across the LUT's
# 576-trit and the int8 GEMM's 512-trit blocks, M across the GEMM's 8-row blocks and the op's 64-row tiles.
SLAB_SHAPES = [(1, 1300, 700), (2, 577, 257), (4, 40, 530), (8, 513, 33), (9, 1300, 97), (17, 256, 64), (70, 700, 45)]


@pytest.mark.parametrize("act_quant", [0, 1])
def test_ternary_matmul_variants_and_thread_counts_agree(monkeypatch, act_quant):
    """Every variant at 1 and 3 intra-op threads against the dense reference; the result does not depend on the
    thread count (each output is one task's, in one order); and where the spec fixes the bits they match the
    scalar reference's: act_quant (exact int32 sums, one order of float products) and the exact LUT path (M <= 4,
    constant W: one summation order in every variant that has it, scalar and avx512)."""
    rng = np.random.default_rng(21)
    for m, k, n in SLAB_SHAPES:
        a, w, s = tmm_case(rng, m, k, n, "2bit")
        ref = ternary_matmul(a, w, s, k, "2bit", act_quant)
        ys = {}
        for v in VARIANTS:
            monkeypatch.setenv("BMOE_KERNEL", v)
            for threads in (1, 3):
                y = run("TernaryMatMul", {"A": a, "W": w, "s": s}, const=("W", "s"), threads=threads, K=k,
                        act_quant=act_quant)
                if act_quant:
                    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-30, err_msg=f"{v} {(m, k, n)}")
                else:
                    tol = 1e-5 * (1 + np.abs(a).sum(1, keepdims=True)) * np.abs(s)
                    assert np.all(np.abs(y - ref) <= tol), f"{v} {(m, k, n)} max err {np.abs(y - ref).max()}"
                ys[v, threads] = y
            np.testing.assert_array_equal(ys[v, 1], ys[v, 3], err_msg=f"{v} {(m, k, n)}: 1 vs 3 threads")
        same = VARIANTS if act_quant else [v for v in ("scalar", "avx512") if v in VARIANTS and m <= 4]
        for v in same:
            np.testing.assert_array_equal(ys[v, 1], ys["scalar", 1], err_msg=f"{v} vs scalar {(m, k, n)}")


@pytest.mark.parametrize("act_quant", [0, 1])
def test_ternary_matmul_repeated_runs_keep_their_bits(act_quant):
    """Decode products split over threads by contiguous shares with stealing (ort_glue.h: the first call of a
    session has one share and the other threads steal from it; later calls have a share per thread seen): run after
    run on one 3-thread session, the same bits as a 1-thread session, and within the spec of the reference."""
    rng = np.random.default_rng(23)
    for m, k, n in [(1, 1300, 700), (1, 5000, 300), (3, 700, 1000)]:
        _, w, s = tmm_case(rng, m, k, n, "2bit")
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(s, "s")]
        model = make_model("TernaryMatMul", {"A": np.zeros((m, k), np.float32), "W": w, "s": s}, initializers=inits,
                           K=k, act_quant=act_quant)
        one, three = session(model, 1), session(model, 3)
        for _ in range(4):
            a = rng.standard_normal((m, k)).astype(np.float32)
            y1, y3 = one.run(None, {"A": a})[0], three.run(None, {"A": a})[0]
            np.testing.assert_array_equal(y3, y1, err_msg=f"{(m, k, n)}: 3 threads vs 1")
            ref = ternary_matmul(a, w, s, k, "2bit", act_quant)
            tol = 1e-5 * (1 + np.abs(a).sum(1, keepdims=True)) * np.abs(s)
            assert np.all(np.abs(y1 - ref) <= tol), f"{(m, k, n)} max err {np.abs(y1 - ref).max()}"


# act_quant at M <= 7 with a constant W reads digit rows repacked at kernel creation (ternary.h), otherwise the
# 2-bit rows: shapes across 256-trit chunks, the op's 64-row tiles and the 4-row blocks of A, ragged K.
DIGIT_SHAPES = [(1, 1, 1), (1, 300, 70), (2, 577, 33), (4, 1300, 130), (5, 256, 17), (7, 40, 9), (8, 300, 10)]


@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_act_quant_digit_rows_equal_2bit_rows(variant, packing):
    """Same bits from the digit-row path (constant W) as from the 2-bit path (W an input), both against the
    dense reference."""
    rng = np.random.default_rng(31)
    for m, k, n in DIGIT_SHAPES:
        a, w, s = tmm_case(rng, m, k, n, packing)
        inputs = {"A": a, "W": w, "s": s}
        ys = [run("TernaryMatMul", inputs, const=c, threads=2, K=k, packing=packing, act_quant=1) for c in ((), ("W",))]
        np.testing.assert_allclose(ys[1], ternary_matmul(a, w, s, k, packing, 1), rtol=2e-6, atol=1e-30,
                                   err_msg=f"{(m, k, n)}")
        np.testing.assert_array_equal(ys[1], ys[0], err_msg=f"{(m, k, n)}: digit rows vs 2-bit rows")


def test_act_quant_long_rows_stay_exact(variant):
    """K = 9e6: one row of all +1 against activations all at max|a| sums 127·K (~1.1e9) exactly. The digit
    kernels hold 4^3 · Σ d·q per plane, which passes 2^31 near K = 8.4e6 unless folded in spans."""
    k = 9_000_000
    t = np.zeros((3, k), np.int8)
    t[0], t[1] = 1, -1
    t[2, ::3] = 1
    a = np.full((1, k), 0.5, np.float32)
    s = np.ones(3, np.float32)
    y = run("TernaryMatMul", {"A": a, "W": pack_trits(t), "s": s}, const=("W",), K=k, act_quant=1)
    # q = 127 everywhere, qscale = 0.5 / 127: Y = qscale · Σ t·127, within float32 rounding of the product
    np.testing.assert_allclose(y, [[0.5 * k, -0.5 * k, 0.5 * -(-k // 3)]], rtol=1e-6)


@pytest.mark.parametrize("m", [1, 9])
def test_act_quant_rounds_half_away_from_zero(variant, m):
    """Hand-computed quantization: max|a| = 127 makes the step exactly 1, and W = I reads q back (Y = q)."""
    row = [127, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5, 0.49999997, -0.49999997, 3.4999998, 0, -0.0, 0.25]
    want = [127, 3, -3, 1, -1, 2, -2, 127, -127, 0, 0, 3, 0, 0, 0]
    k = len(row)
    a = np.tile(np.array(row, np.float32), (m, 1))
    a[1:] *= -1  # the GEMM path (m >= 8) sees both signs in one call
    w = pack_trits(np.eye(k, dtype=np.int8))
    y = run("TernaryMatMul", {"A": a, "W": w, "s": np.ones(k, np.float32)}, const=("W",), K=k, act_quant=1)
    expect = np.tile(np.array(want, np.float32), (m, 1))
    expect[1:] *= -1
    np.testing.assert_array_equal(y, expect)


def test_kernel_choice_by_calibration():
    """BmoeTernaryKernel names the variant TernaryMatMul uses per mode: timed at first use (one of the CPU's SIMD
    variants), by CPU features with BMOE_CALIBRATE=0, forced by BMOE_KERNEL. The choice is cached per process, so
    each case runs in a fresh one."""
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.BmoeTernaryKernel.restype = ctypes.c_char_p; "
            "print(lib.BmoeTernaryKernel(0).decode(), lib.BmoeTernaryKernel(1).decode())")
    base = {k: v for k, v in os.environ.items() if k not in ("BMOE_KERNEL", "BMOE_CALIBRATE")}

    def choice(**env):
        out = subprocess.run([sys.executable, "-c", code, str(ort_ops.library_path())], env={**base, **env},
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    simd = [v for v in VARIANTS if v != "scalar"] or ["scalar"]
    assert set(choice()) <= set(simd)
    assert choice(BMOE_CALIBRATE="0") == [VARIANTS[-1]] * 2
    assert choice(BMOE_KERNEL="scalar") == ["scalar"] * 2


def angles_of(rng, e, d, dtype):
    p, s_count = stages(d)
    theta = rng.uniform(-np.pi, np.pi, (e, s_count, p // 2)).astype(np.float32)
    if dtype == "int8":
        scale = (np.pi / 127 * rng.uniform(0.5, 1, e)).astype(np.float32)
        return rng.integers(-127, 128, theta.shape).astype(np.int8), scale
    return theta.astype(dtype), None


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("const_angles", [False, True])
def test_butterfly_rotate(variant, dtype, const_angles):
    rng = np.random.default_rng(3)
    for i, (m, d, e) in enumerate([(4, 2, 1), (5, 3, 2), (3, 6, 3), (7, 16, 2), (6, 17, 4), (9, 100, 3),
                                   (1, 768, 1), (33, 768, 5), (0, 40, 2), (2, 1024, 2),
                                   (60, 64, 19)]):  # > 8 experts: several groups a call
        x = rng.standard_normal((m, d)).astype(np.float32)
        angles, scale = angles_of(rng, e, d, dtype)
        idx = rng.integers(0, e, m).astype(np.int64) if (e > 1 or i % 2) else None
        for transpose in (0, 1):
            inputs = {"X": x, "angles": angles, "expert_index": idx, "angle_scale": scale}
            const = tuple(n for n in ("angles", "angle_scale") if const_angles and inputs[n] is not None)
            y = run("ButterflyRotate", inputs, const=const, threads=1 + i % 2, transpose=transpose)
            ref = butterfly_rotate(x, angles, idx, scale, bool(transpose))
            tol = 1e-5 * (1 + np.abs(x).max(initial=0))
            assert y.shape == x.shape and np.abs(y - ref).max(initial=0) <= tol, (m, d, e, transpose)


def _cos_sin_by_rotation(theta, scale=None):
    """D = 2 has one pair: rotating x = (1, 0) by expert e's angle gives (cos θ_e, sin θ_e)."""
    e = len(theta)
    x = np.tile(np.array([[1, 0]], np.float32), (e, 1))
    inputs = {"X": x, "angles": theta.reshape(e, 1, 1), "expert_index": np.arange(e, dtype=np.int64),
              "angle_scale": scale}
    return run("ButterflyRotate", inputs, const=tuple(n for n in ("angles", "angle_scale") if inputs[n] is not None))


def test_cos_sin_against_float64(variant):
    """The op's own sincos (custom_ops/src/sincos.cc): ≤ 2 float32 ulp of the float64 value over angles up to
    8192 rad, libm beyond, NaN/Inf propagate; fp16 widened exactly (subnormals, Inf); int8 × scale."""
    rng = np.random.default_rng(11)
    theta = np.concatenate([rng.uniform(-4, 4, 3000), rng.uniform(-200, 200, 1000), rng.uniform(-8192, 8192, 500),
                            [0.0, -0.0, np.pi / 4, np.pi / 2, np.pi, 1e-30, 8191.9, 8192.0, 8192.5, -1e4, 3e7,
                             1e38]]).astype(np.float32)
    y = _cos_sin_by_rotation(theta)
    ref = np.stack([np.cos(theta.astype(np.float64)), np.sin(theta.astype(np.float64))], 1)
    assert np.abs(y - ref).max() <= 2 * 2.0 ** -24, np.abs(y - ref).max()
    special = _cos_sin_by_rotation(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert np.isnan(special).all()

    half = np.array([0, 1, 0x03ff, 0x0400, 0x3c00, 0x4248, 0xc248, 0x8001, 0x7bff, 0x7c00, 0x7e00],
                    np.uint16).view(np.float16)  # zero, subnormals, normals, ±π-ish, max, Inf, NaN
    y = _cos_sin_by_rotation(half)
    wide = half.astype(np.float64)  # exact
    with np.errstate(invalid="ignore"):
        ref = np.stack([np.cos(wide), np.sin(wide)], 1)
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.abs(y[ok] - ref[ok]).max() <= 2 * 2.0 ** -24

    q = np.arange(-127, 128, dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, q.size).astype(np.float32)
    y = _cos_sin_by_rotation(q, scale)
    th = (q.astype(np.float32) * scale).astype(np.float64)  # the op's float32 product
    assert np.abs(y - np.stack([np.cos(th), np.sin(th)], 1)).max() <= 2 * 2.0 ** -24


_RSS_PROBE = """
import sys, numpy as np, onnxruntime as ort
from bmoe_runtime.backends import ort_ops
path, d, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; ort_ops.register(so)
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
for _ in range(4):  # prefill-like calls: 16 rows over many experts
    s.run(None, {"X": rng.standard_normal((16, d)).astype(np.float32), "I": rng.integers(0, e, 16)})
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_resident_peak_rss_grows_by_the_angle_bytes(tmp_path):
    """Resident ButterflyRotate keeps no per-expert cos/sin tables: peak RSS of a session over 512 experts minus one
    over 8 is at most 1.2 × the angle bytes added (fp32 tables of every expert would be ~5.6× them)."""
    import subprocess
    import sys

    from onnx import save_model

    d, peaks, sizes = 1024, {}, {}
    for e in (8, 512):
        angles, _ = angles_of(np.random.default_rng(e), e, d, "float16")
        model = make_model("ButterflyRotate", {"X": np.zeros((1, d), np.float32), "A": angles,
                                               "I": np.zeros(1, np.int64)},
                           initializers=[numpy_helper.from_array(angles, "A")])
        path = tmp_path / f"e{e}" / "model.onnx"
        path.parent.mkdir()
        save_model(model, str(path), save_as_external_data=True, location="angles.bin", size_threshold=0)
        sizes[e] = (path.parent / "angles.bin").stat().st_size
        out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(d), str(e)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        peaks[e] = int(out.stdout)
    grown, angle_bytes = peaks[512] - peaks[8], sizes[512] - sizes[8]
    assert grown <= 1.2 * angle_bytes, (grown / angle_bytes, peaks, sizes)


def test_butterfly_roundtrip_and_trailing_omitted_input(variant):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    angles, _ = angles_of(rng, 1, 300, "float32")
    y = run("ButterflyRotate", {"X": x, "angles": angles})  # expert_index and angle_scale omitted
    back = run("ButterflyRotate", {"X": y, "angles": angles}, transpose=1)
    np.testing.assert_allclose(back, x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


# ------------------------------------------------------------------------------ errors

def _tmm_inputs(**over):
    rng = np.random.default_rng(5)
    a, w, s = tmm_case(rng, 3, 10, 4, "2bit")
    inputs = {"A": a, "W": w, "s": s}
    inputs.update(over)
    return inputs


def _bad_code(packing):
    w = pack_trits(np.zeros((4, 10), np.int8), packing)
    w[2, 1] = 0b11 << 2 if packing == "2bit" else 250
    return w


TMM_ERRORS = [
    (dict(A=np.zeros((3, 10))), {}, "input A must be float32, got float64"),
    (dict(A=np.zeros((1, 3, 10), np.float32)), {}, "input A must have rank 2"),
    (dict(A=np.zeros((3, 11), np.float32)), {}, "has 11 columns but attribute K = 10"),
    (dict(W=np.zeros((4, 3), np.int8)), {}, "input W_packed must be uint8, got int8"),
    (dict(W=np.zeros(12, np.uint8)), {}, "input W_packed must have rank 2"),
    (dict(W=np.zeros((4, 2), np.uint8)), {}, "has 2 bytes per row, expected 3 for K = 10"),
    (dict(W=np.zeros((0, 3), np.uint8), s=np.zeros(0, np.float32)), {}, "N >= 1"),
    (dict(s=np.ones(5, np.float32)), {}, "input scale must have shape \\[N\\] = \\[4\\]"),
    (dict(s=np.ones(4, np.float64)), {}, "input scale must be float32"),
    (dict(W=_bad_code("2bit")), {}, "invalid 2-bit trit code"),
    (dict(W=_bad_code("2bit")), dict(act_quant=1), "invalid 2-bit trit code"),
    (dict(W=_bad_code("base3")), dict(packing="base3"), "invalid base3 byte"),
    ({}, dict(packing="base3"), "has 3 bytes per row, expected 2 for K = 10 \\(base3"),
    ({}, dict(K=0), "attribute K must be in \\[1, 16777216\\], got 0"),
    ({}, dict(K=None), "attribute K is required"),
    ({}, dict(packing="3bit"), "attribute packing must be"),
    ({}, dict(act_quant=2), "attribute act_quant must be 0 or 1"),
]


@pytest.mark.parametrize("over, attrs, msg", TMM_ERRORS)
def test_ternary_matmul_errors(variant, over, attrs, msg):
    attrs = {"K": 10, **attrs}
    attrs = {k: v for k, v in attrs.items() if v is not None}
    with pytest.raises(Exception, match=msg):
        run("TernaryMatMul", _tmm_inputs(**over), **attrs)


def _rot_inputs(**over):
    rng = np.random.default_rng(6)
    angles, _ = angles_of(rng, 3, 6, "float32")
    inputs = {"X": rng.standard_normal((4, 6)).astype(np.float32), "angles": angles,
              "expert_index": np.array([0, 2, 1, 0], np.int64), "angle_scale": None}
    inputs.update(over)
    return inputs


ROT_ERRORS = [
    (dict(X=np.zeros((4, 6), np.int32)), {}, "input X must be float32, got int32"),
    (dict(X=np.zeros(6, np.float32)), {}, "input X must have rank 2"),
    (dict(X=np.zeros((4, 1), np.float32), angles=np.zeros((3, 1, 1), np.float32)), {}, "D >= 2"),
    (dict(angles=np.zeros((3, 3, 4), np.float64)), {}, "float32, float16 or int8, got float64"),
    (dict(angles=np.zeros((3, 12), np.float32)), {}, "input angles must have rank 3"),
    (dict(angles=np.zeros((3, 3, 3), np.float32)), {}, "must have shape \\[E >= 1, 3, 4\\] for D = 6"),
    (dict(angles=np.zeros((3, 2, 4), np.float32)), {}, "must have shape \\[E >= 1, 3, 4\\]"),
    (dict(expert_index=np.array([0, 1, 2, 0], np.int32)), {}, "expert_index must be int64, got int32"),
    (dict(expert_index=np.array([0, 1, 2], np.int64)), {}, "expert_index must have shape \\[M\\] = \\[4\\]"),
    (dict(expert_index=np.array([0, 1, 3, 0], np.int64)), {}, "expert_index\\[2\\] = 3 is out of range \\[0, 3\\)"),
    (dict(expert_index=np.array([0, -1, 0, 0], np.int64)), {}, "expert_index\\[1\\] = -1 is out of range"),
    (dict(expert_index=None), {}, "expert_index is omitted but angles has E = 3"),
    (dict(angles=np.zeros((3, 3, 4), np.int8)), {}, "angle_scale is required when angles is int8"),
    (dict(angle_scale=np.ones(3, np.float32)), {}, "angle_scale must be omitted when angles is float32"),
    (dict(angles=np.zeros((3, 3, 4), np.int8), angle_scale=np.ones(2, np.float32)), {},
     "angle_scale must have shape \\[E\\] = \\[3\\]"),
    (dict(angles=np.zeros((3, 3, 4), np.int8), angle_scale=np.ones(3, np.float16)), {},
     "angle_scale must be float32, got float16"),
    ({}, dict(transpose=2), "attribute transpose must be 0 or 1, got 2"),
]


@pytest.mark.parametrize("over, attrs, msg", ROT_ERRORS)
@pytest.mark.parametrize("const_angles", [False, True])
def test_butterfly_rotate_errors(over, attrs, msg, const_angles):
    inputs = _rot_inputs(**over)
    const = tuple(n for n in ("angles", "angle_scale") if const_angles and inputs[n] is not None)
    with pytest.raises(Exception, match=f"ButterflyRotate: .*{msg}"):
        run("ButterflyRotate", inputs, const=const, **attrs)


@pytest.mark.parametrize("value, msg", [("bogus", "is not a kernel variant"),
                                        (next((v for v in ALL_VARIANTS if v not in VARIANTS), "neon"),
                                         "is not available on this CPU")])
def test_forced_variant_errors(monkeypatch, value, msg):
    monkeypatch.setenv("BMOE_KERNEL", value)
    with pytest.raises(Exception, match=f"BMOE_KERNEL={value} {msg}"):
        run("ButterflyRotate", _rot_inputs())


# ------------------------------------------------------------------- threads & loading

def test_concurrent_runs_on_one_session():
    rng = np.random.default_rng(7)
    k, n, d = 96, 40, 40
    w = pack_trits(rng.integers(-1, 2, (n, k)).astype(np.int8))
    s = rng.random(n).astype(np.float32)
    angles, _ = angles_of(rng, 3, d, "float32")
    x = helper.make_tensor_value_info
    nodes = [helper.make_node("TernaryMatMul", ["A", "W", "s"], ["H"], domain="ai.bmoe", K=k),
             helper.make_node("ButterflyRotate", ["H", "angles", "idx"], ["Y"], domain="ai.bmoe")]
    graph = helper.make_graph(nodes, "g", [x("A", TensorProto.FLOAT, None), x("idx", TensorProto.INT64, None)],
                              [x("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, nm) for nm, v in
                                           (("W", w), ("s", s), ("angles", angles))])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                           helper.make_opsetid("ai.bmoe", 1)]), threads=2)
    cases = []
    for i in range(8):
        a = rng.standard_normal((1 + 3 * i, k)).astype(np.float32)
        idx = rng.integers(0, 3, len(a)).astype(np.int64)
        cases.append((a, idx, butterfly_rotate(ternary_matmul(a, w, s, k), angles, idx)))
    errors = []

    def worker(t):
        for r in range(25):
            a, idx, ref = cases[(t + r) % len(cases)]
            y = sess.run(None, {"A": a, "idx": idx})[0]
            if not np.allclose(y, ref, atol=1e-3):
                errors.append((t, r))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_library_path_env_override(monkeypatch, tmp_path):
    real = ort_ops.library_path()
    monkeypatch.setenv("BMOE_OPS_LIB", str(real))
    assert ort_ops.library_path() == real
    monkeypatch.setenv("BMOE_OPS_LIB", str(tmp_path / "missing.so"))
    assert ort_ops.library_path() is None and not ort_ops.available()
    with pytest.raises(BmoeError, match="libbmoe_ops.so not found"):
        ort_ops.register(ort.SessionOptions())


# ------------------------------------------------- ButterflyRotate, streamed form

_ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8}


def streamed_session(path, angles, offset, slots, scale=None, threads=1, transpose=0, model_dir=None, **extra):
    """One streamed ButterflyRotate reading `angles` [E, S, P/2] at `offset` of `path`, which is
    named relative to the model directory (by default path's own)."""
    inits = [numpy_helper.from_array(scale, "scale")] if scale is not None else []
    model_dir = path.parent if model_dir is None else model_dir
    attrs = dict(angle_file=path.name, angle_file_size=path.stat().st_size if path.exists() else 0,
                 angle_offset=offset, angle_experts=angles.shape[0],
                 angle_dtype=_ONNX_DTYPE[angles.dtype.name], cache_slots=slots, transpose=transpose)
    attrs.update(extra)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    inputs = {"X": np.zeros((1, 2), np.float32), "angles": None, "idx": np.zeros(1, np.int64),
              "scale": scale}
    return session(make_model("ButterflyRotate", inputs, initializers=inits, **attrs), threads, model_dir)


def write_angles(path, angles, pad=64):
    """angles.bin-like file: `pad` junk bytes, then the table; returns the table's offset."""
    path.write_bytes(b"\x7f" * pad + angles.tobytes() + b"\x7f" * 16)
    return pad


def cache_stats():
    import ctypes
    lib = ctypes.CDLL(str(ort_ops.library_path()))
    v = [ctypes.c_uint64() for _ in range(3)]
    lib.BmoeAngleCacheStats(*[ctypes.byref(x) for x in v])
    return [x.value for x in v]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_butterfly_rotate_streamed(variant, dtype, tmp_path):
    rng = np.random.default_rng(11)
    for i, (m, d, e) in enumerate([(5, 3, 2), (6, 17, 4), (9, 100, 3), (33, 768, 5), (0, 40, 2), (4, 64, 1)]):
        angles, scale = angles_of(rng, e, d, dtype)
        offset = write_angles(tmp_path / f"a{i}.bin", angles)
        for slots in sorted({1, 2, e}):
            for transpose in (0, 1):
                sess = streamed_session(tmp_path / f"a{i}.bin", angles, offset, slots, scale, threads=1 + i % 2,
                                        transpose=transpose)
                for _ in range(2):  # second call: from the cache (or re-read when C is small)
                    x = rng.standard_normal((m, d)).astype(np.float32)
                    idx = rng.integers(0, e, m).astype(np.int64)
                    feeds = {"X": x, "idx": idx}
                    y = sess.run(None, feeds)[0]
                    ref = butterfly_rotate(x, angles, idx, scale, bool(transpose))
                    tol = 1e-5 * (1 + np.abs(x).max(initial=0))
                    assert y.shape == x.shape and np.abs(y - ref).max(initial=0) <= tol, (m, d, e, slots)
                    resident = run("ButterflyRotate", {"X": x, "angles": angles, "idx": idx, "scale": scale},
                                   const=("angles",) + (("scale",) if scale is not None else ()),
                                   transpose=transpose)
                    assert np.array_equal(y, resident)  # same tables, same kernel: bit-exact


def test_streamed_counters(tmp_path):
    rng = np.random.default_rng(12)
    angles, _ = angles_of(rng, 4, 32, "float16")
    offset = write_angles(tmp_path / "a.bin", angles)
    slice_bytes = angles[0].nbytes
    sess = streamed_session(tmp_path / "a.bin", angles, offset, 2)
    x = np.ones((3, 32), np.float32)
    lib_reset = __import__("ctypes").CDLL(str(ort_ops.library_path())).BmoeAngleCacheReset
    lib_reset()
    sess.run(None, {"X": x, "idx": np.array([0, 1, 0], np.int64)})  # 2 misses
    sess.run(None, {"X": x, "idx": np.array([1, 0, 1], np.int64)})  # 2 hits
    sess.run(None, {"X": x, "idx": np.array([2, 3, 0], np.int64)})  # in expert order: 0 hit, 2 and 3 miss
    sess.run(None, {"X": x[:1], "idx": np.array([0], np.int64)})  # evicted by 3: miss
    assert cache_stats() == [3, 5, 5 * slice_bytes]
    lib_reset()
    assert cache_stats() == [0, 0, 0]


STREAM_ERRORS = [
    (dict(cache_slots=0), "attribute cache_slots is required with angle_file and must be >= 1"),
    (dict(cache_slots=None), "attribute cache_slots is required"),
    (dict(angle_experts=None), "attribute angle_experts is required"),
    (dict(angle_dtype=7), "attribute angle_dtype must be 1 \\(float32\\), 10 \\(float16\\) or 3 \\(int8\\), got 7"),
    (dict(angle_offset=-1), "attribute angle_offset must be >= 0"),
    (dict(angle_file_size=None), "attribute angle_file_size is required with angle_file"),
    (dict(angle_file="nope.bin"), "cannot open angle_file 'nope.bin' \\('.*/nope.bin'\\): No such file"),
]


@pytest.mark.parametrize("attrs, msg", STREAM_ERRORS)
def test_streamed_attribute_errors(tmp_path, attrs, msg):
    rng = np.random.default_rng(13)
    angles, _ = angles_of(rng, 3, 6, "float32")
    offset = write_angles(tmp_path / "a.bin", angles)
    with pytest.raises(Exception, match=f"ButterflyRotate: .*{msg}"):
        streamed_session(tmp_path / "a.bin", angles, offset, 2, **attrs)


def test_streamed_input_errors(tmp_path):
    rng = np.random.default_rng(14)
    angles, scale = angles_of(rng, 3, 6, "int8")
    offset = write_angles(tmp_path / "a.bin", angles)
    x = np.zeros((2, 6), np.float32)
    with pytest.raises(Exception, match="angle_scale is required when angles is int8"):
        streamed_session(tmp_path / "a.bin", angles, offset, 2).run(None, {"X": x, "idx": np.zeros(2, np.int64)})
    sess = streamed_session(tmp_path / "a.bin", angles, offset, 2, scale)
    with pytest.raises(Exception, match="expert_index\\[1\\] = 3 is out of range \\[0, 3\\)"):
        sess.run(None, {"X": x, "idx": np.array([0, 3], np.int64)})
    # angles given as well as angle_file
    inputs = {"X": x, "angles": angles, "idx": np.zeros(2, np.int64), "scale": scale}
    attrs = dict(angle_file="a.bin", angle_file_size=(tmp_path / "a.bin").stat().st_size, angle_offset=offset,
                 angle_experts=3, angle_dtype=3, cache_slots=1)
    with pytest.raises(Exception, match="input angles must be omitted when angle_file is set"):
        sess = session(make_model("ButterflyRotate", inputs, **attrs), model_dir=tmp_path)
        sess.run(None, {k: v for k, v in inputs.items() if v is not None})
    with pytest.raises(Exception, match="attribute angle_file_size is only allowed with angle_file"):
        run("ButterflyRotate", inputs, angle_file_size=1)
    with pytest.raises(Exception, match="attribute cache_slots is only allowed with angle_file"):
        run("ButterflyRotate", inputs, cache_slots=1)
    with pytest.raises(Exception, match="input angles is required"):
        run("ButterflyRotate", {**inputs, "angles": None})


def test_streamed_truncated_file_is_an_error_not_garbage(tmp_path):
    rng = np.random.default_rng(15)
    angles, _ = angles_of(rng, 4, 40, "float16")
    path = tmp_path / "a.bin"
    offset = write_angles(path, angles)
    sess = streamed_session(path, angles, offset, 1)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    sess.run(None, {"X": x, "idx": np.array([0, 1], np.int64)})
    with open(path, "r+b") as f:  # cut into expert 2's slice
        f.truncate(offset + angles[0].nbytes * 2 + 10)
    for e in (2, 3):
        with pytest.raises(Exception, match=f"angle_file '{path}' is truncated: expert {e} needs bytes"):
            sess.run(None, {"X": x, "idx": np.array([0, e], np.int64)})
    y = sess.run(None, {"X": x, "idx": np.array([1, 0], np.int64)})[0]  # intact experts still work
    np.testing.assert_allclose(y, butterfly_rotate(x, angles, np.array([1, 0]), None), atol=1e-4)


def test_streamed_concurrent_runs_with_one_slot(tmp_path):
    """Four threads, C = 1, every call several experts: slots are evicted while other runs use them."""
    rng = np.random.default_rng(16)
    angles, scale = angles_of(rng, 6, 200, "int8")
    offset = write_angles(tmp_path / "a.bin", angles)
    sess = streamed_session(tmp_path / "a.bin", angles, offset, 1, scale, threads=2)
    cases = []
    for i in range(8):
        x = rng.standard_normal((1 + 5 * i, 200)).astype(np.float32)
        idx = rng.integers(0, 6, len(x)).astype(np.int64)
        cases.append((x, idx, butterfly_rotate(x, angles, idx, scale)))
    errors = []

    def worker(t):
        for r in range(20):
            x, idx, ref = cases[(t + r) % len(cases)]
            y = sess.run(None, {"X": x, "idx": idx})[0]
            if not np.allclose(y, ref, atol=1e-4):
                errors.append((t, r))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
