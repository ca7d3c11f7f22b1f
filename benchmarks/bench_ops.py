"""Benchmark the ai.bmoe custom ops against ONNX Runtime baselines.

TernaryMatMul vs fp32 MatMul and com.microsoft MatMulNBits (4- and 2-bit, block 32);
ButterflyRotate vs MatMul by the materialised d×d rotation. Medians of many timed
session runs, ratios against the baseline measured in the same process, 1 and 2
intra-op threads. Not part of the test suite.

    python benchmarks/bench_ops.py [--quick] [--out FILE]   (default runs/bench/ops/bench_ops.md)

docs/benchmarks.md is written by hand from these tables; the script never writes into docs/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bmoe_runtime.backends import ort_ops  # noqa: E402
from bmoe_runtime.format.packing import pack_trits  # noqa: E402
from bench_decode_bandwidth import kernel_choice  # noqa: E402  (benchmarks/ is the script's directory)
from results import cpu_model  # noqa: E402

CHAIN = 32  # ButterflyRotate / its dense baseline: nodes per graph, to amortise Run() overhead


def model(nodes, inputs, inits, outputs=("Y",)):
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "bench", [vi(n, TensorProto.FLOAT, None) for n in inputs],
                              [vi(o, TensorProto.FLOAT, None) for o in outputs],
                              initializer=[numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.bmoe", 1),
                                                   helper.make_opsetid("com.microsoft", 1)])


def time_model(m, feeds, threads, min_time, min_reps=20):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ort_ops.register(so)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, feeds)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------ TernaryMatMul

def nbits_inputs(rng, k, n, bits, block=32):
    """MatMulNBits B [N, K/block, block*bits/8] uint8 and scales [N * K/block] (no zero points)."""
    blocks = (k + block - 1) // block
    b = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks) * 0.01).astype(np.float32)
    return b, scales


def matmul_models(rng, k, n):
    trits = rng.integers(-1, 2, (n, k)).astype(np.int8)
    tw = {"W": pack_trits(trits), "s": rng.random(n).astype(np.float32)}
    out = {}
    for name, aq in (("ternary", 0), ("ternary_i8", 1)):
        out[name] = model([helper.make_node("TernaryMatMul", ["A", "W", "s"], ["Y"], domain="ai.bmoe", K=k,
                                            act_quant=aq)], ["A"], tw)
    out["fp32"] = model([helper.make_node("MatMul", ["A", "B"], ["Y"])], ["A"],
                        {"B": rng.standard_normal((k, n)).astype(np.float32)})
    for bits in (4, 2):
        b, scales = nbits_inputs(rng, k, n, bits)
        out[f"nbits{bits}"] = model([helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"],
                                                      domain="com.microsoft", K=k, N=n, bits=bits,
                                                      block_size=32, accuracy_level=4)],
                                               ["A"], {"B": b, "scales": scales})
    return out


def bench_matmul(args, threads_list, log):
    rng = np.random.default_rng(0)
    shapes = [(4096, 4096)] if args.quick else [(512, 2048), (2048, 512), (4096, 4096)]
    ms = [1] if args.quick else [1, 16, 128]
    impls = ["fp32", "nbits4", "nbits2", "ternary", "ternary_i8"]
    rows = []
    for k, n in shapes:
        models = matmul_models(rng, k, n)
        for m in ms:
            feeds = {"A": rng.standard_normal((m, k)).astype(np.float32)}
            for th in threads_list:
                t = {i: time_model(models[i], feeds, th, args.min_time) for i in impls}
                rows.append((m, k, n, th, t))
                log(f"TernaryMatMul M={m} K={k} N={n} threads={th}: " +
                    ", ".join(f"{i} {t[i] * 1e3:.3f} ms" for i in impls))
    lines = ["| M | K | N | threads | fp32 MatMul | MatMulNBits 4b | MatMulNBits 2b | TernaryMatMul | "
             "vs fp32 | vs 4b | vs 2b | TernaryMatMul act_quant=1 | vs fp32 | vs 4b |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, k, n, th, t in rows:
        ms_ = {i: f"{t[i] * 1e3:.3f}" for i in impls}
        lines.append(f"| {m} | {k} | {n} | {th} | {ms_['fp32']} | {ms_['nbits4']} | {ms_['nbits2']} | "
                     f"{ms_['ternary']} | {t['fp32'] / t['ternary']:.1f}× | {t['nbits4'] / t['ternary']:.2f}× | "
                     f"{t['nbits2'] / t['ternary']:.2f}× | {ms_['ternary_i8']} | "
                     f"{t['fp32'] / t['ternary_i8']:.1f}× | {t['nbits4'] / t['ternary_i8']:.2f}× |")
    return lines


# ---------------------------------------------------------------------- ButterflyRotate

def rotation_matrix(theta, d):
    """Dense B(θ)ᵀ-ready matrix: y = x @ R with R = B(θ)ᵀ (float32)."""
    b = np.eye(d, dtype=np.float64)
    for s in range(theta.shape[0]):
        h = 1 << s
        for start in range(0, d, 2 * h):
            j = np.arange(start, min(start + h, d - h))
            k = (j >> (s + 1) << s) | (j & (h - 1))
            c, sn = np.cos(theta[s, k])[:, None], np.sin(theta[s, k])[:, None]
            lo, hi = b[j].copy(), b[j + h].copy()
            b[j], b[j + h] = c * lo - sn * hi, sn * lo + c * hi
    return b.T.astype(np.float32)


def bench_rotate(args, threads_list, log):
    rng = np.random.default_rng(1)
    ds = [1024] if args.quick else [512, 1024, 2048, 4096]
    rows = []
    for d in ds:
        s_count = d.bit_length() - 1
        theta = rng.uniform(-np.pi, np.pi, (1, s_count, d // 2)).astype(np.float32)
        names = ["X"] + [f"h{i}" for i in range(1, CHAIN)] + ["Y"]
        rot = model([helper.make_node("ButterflyRotate", [names[i], "angles"], [names[i + 1]], domain="ai.bmoe",
                                      transpose=i % 2) for i in range(CHAIN)], ["X"], {"angles": theta})
        dense = model([helper.make_node("MatMul", [names[i], "R"], [names[i + 1]]) for i in range(CHAIN)], ["X"],
                      {"R": rotation_matrix(theta[0].astype(np.float64), d)})
        for m in [1, 64]:
            feeds = {"X": rng.standard_normal((m, d)).astype(np.float32)}
            for th in threads_list:
                tr = time_model(rot, feeds, th, args.min_time) / CHAIN
                td = time_model(dense, feeds, th, args.min_time) / CHAIN
                rows.append((d, m, th, td, tr))
                log(f"ButterflyRotate d={d} M={m} threads={th}: dense {td * 1e6:.1f} us, "
                    f"butterfly {tr * 1e6:.2f} us, {td / tr:.1f}x")
    lines = ["| d | M | threads | dense MatMul (µs/op) | ButterflyRotate (µs/op) | speed-up |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {d} | {m} | {th} | {td * 1e6:.1f} | {tr * 1e6:.2f} | {td / tr:.1f}× |" for d, m, th, td, tr in rows]
    return lines


def run_overhead(args):
    m = model([helper.make_node("Identity", ["X"], ["Y"])], ["X"], {})
    return time_model(m, {"X": np.zeros((1, 16), np.float32)}, 1, args.min_time)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the headline shapes")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per measurement")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--only", choices=["matmul", "rotate"])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ops" / "bench_ops.md",
                   help="also write the markdown tables to this file (not under docs/)")
    args = p.parse_args()
    if (REPO / "docs") in args.out.resolve().parents:
        sys.exit(f"--out {args.out}: docs/ is curated by hand from the results; write the results elsewhere")
    if not ort_ops.available():
        sys.exit("libbmoe_ops.so is not built")
    threads = [int(t) for t in args.threads.split(",")]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    choice = " / ".join(kernel_choice(str(ort_ops.library_path())).values())
    header = [f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; "
              f"kernel variant: {os.environ.get('BMOE_KERNEL', 'auto')} "
              f"(TernaryMatMul exact / act_quant: {choice}); "
              f"ORT Run() overhead (1-node Identity graph): {run_overhead(args) * 1e6:.1f} µs", ""]
    out = header[:]
    if args.only in (None, "matmul"):
        out += ["### TernaryMatMul (median ms per Run of a 1-node graph)", ""] + bench_matmul(args, threads, log) + [""]
    if args.only in (None, "rotate"):
        out += [f"### ButterflyRotate (median per op, graphs of {CHAIN} chained nodes)", ""] + \
               bench_rotate(args, threads, log) + [""]
    text = "\n".join(out)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
