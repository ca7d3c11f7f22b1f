"""Resident ButterflyRotate at decode: µs per call and peak RSS for one or more builds of libbmoe_ops.so.

One node with constant fp16 angles of E experts, called with M rows whose experts are drawn at random each call
(M=2: one token's top-2 pairs; M=128: a prefill chunk). Each library runs in its own subprocess, libraries
alternate for --rounds rounds, and the table gives the median over rounds of each round's median (min–max of the
round medians). Used to compare the per-call cos/sin tables against a build that precomputes every expert's
tables (a build of any commit before e1161be).

    python benchmarks/bench_rotate_decode.py --lib NEW.so --lib OLD.so [--experts 64,256] [--dims 1024,4096]

Writes stdout only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_bandwidth import _field, _node, _value_info, cpu_model  # noqa: E402

_CHILD = r"""
import json, sys, time, statistics, numpy as np, onnxruntime as ort
lib, path, e, d, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.register_custom_ops_library(lib)
t0 = time.perf_counter(); s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
create = time.perf_counter() - t0
rng = np.random.default_rng(0); out = {"create_ms": create * 1e3}
for m in (2, 128):
    feeds = [{"X": rng.standard_normal((m, d)).astype(np.float32), "I": rng.integers(0, e, m)} for _ in range(16)]
    ts = []
    for i in range(reps if m == 2 else reps // 10):
        f = feeds[i % 16]; t0 = time.perf_counter(); s.run(None, f); ts.append(time.perf_counter() - t0)
    out[f"m{m}_us"] = statistics.median(ts) * 1e6
out["hwm_mib"] = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps(out))
"""


def write_model(path: Path, e: int, d: int) -> None:
    import numpy as np

    s_count = (d - 1).bit_length()
    angles = np.random.default_rng(e).uniform(-np.pi, np.pi, (e, s_count, (1 << s_count) // 2)).astype(np.float16)
    node = _node("ButterflyRotate", ["X", "A", "I"], ["Y"], "ai.bmoe")
    # TensorProto of FLOAT16 (10): dims, data_type, name, raw_data
    raw = b"".join(_field(1, x) for x in angles.shape) + _field(2, 10) + _field(8, "A") + _field(9, angles.tobytes())
    graph = _field(1, node) + _field(2, "rot") + _field(5, raw) + _field(11, _value_info("X")) + \
        _field(11, _value_info("I", 7)) + _field(12, _value_info("Y"))
    opsets = _field(8, _field(1, "") + _field(2, 17)) + _field(8, _field(1, "ai.bmoe") + _field(2, 1))
    path.write_bytes(_field(1, 8) + opsets + _field(7, graph))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", action="append", required=True)
    ap.add_argument("--experts", default="64,256")
    ap.add_argument("--dims", default="1024,4096")
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tmp", type=Path, default=Path("/tmp/bmoe_bench_rotate"))
    args = ap.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    print(f"# Resident ButterflyRotate at decode — {cpu_model()}, 1 thread, fp16 angles; median of "
          f"{args.rounds} round medians (min–max)\n")
    print("| E | D | library | M=2 µs | M=128 µs | session creation ms | peak RSS MiB |\n|---|---|---|---|---|---|---|")
    for e in (int(x) for x in args.experts.split(",")):
        for d in (int(x) for x in args.dims.split(",")):
            path = args.tmp / f"rot_e{e}_d{d}.onnx"
            write_model(path, e, d)
            res: dict[str, list[dict]] = {lib: [] for lib in args.lib}
            for _ in range(args.rounds):
                for lib in args.lib:
                    out = subprocess.run([sys.executable, "-c", _CHILD, lib, str(path), str(e), str(d),
                                          str(args.reps)], capture_output=True, text=True, check=True)
                    res[lib].append(json.loads(out.stdout))
            for lib, rounds in res.items():
                def cell(key: str) -> str:
                    v = sorted(r[key] for r in rounds)
                    return f"{statistics.median(v):.1f} ({v[0]:.1f}–{v[-1]:.1f})"
                print(f"| {e} | {d} | {lib} | {cell('m2_us')} | {cell('m128_us')} | {cell('create_ms')} | "
                      f"{cell('hwm_mib')} |", flush=True)


if __name__ == "__main__":
    main()
