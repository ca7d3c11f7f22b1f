"""Run M=1 TernaryMatMul products in a loop, for a profiler to watch (issue 16: where decode time goes at T threads).

    perf record -g -o /tmp/perf.data -- python benchmarks/native/decode_loop.py --threads 2 --seconds 10
    perf report -i /tmp/perf.data --no-children --sort dso,symbol --percent-limit 1 --stdio

The graph is benchmarks/bench_decode_bandwidth.py's: R nodes with distinct weights (weights from DRAM when R·bytes
exceeds the LLC), one shared activation row. Prints the products run and their median time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_decode_bandwidth import impl_model, ops_library, read_bytes, session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", default="ternary", choices=["ternary", "ternary_aq", "fp32"])
    ap.add_argument("--k", type=int, default=14336)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--nodes", type=int, default=24, help="distinct weight sets (24 × 13 MB at the default shape)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    sess = session(impl_model(a.impl, a.k, a.n, a.nodes, rng), a.threads, ops_library())
    feed = {"A": rng.standard_normal((1, a.k)).astype(np.float32)}
    sess.run(None, feed)
    times, end = [], time.perf_counter() + a.seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) / a.nodes)
    per = statistics.median(times)
    print(f"{a.impl} {a.k}×{a.n}, {a.threads} threads: {len(times) * a.nodes} products, median {per * 1e6:.0f} µs "
          f"({read_bytes(a.impl, a.k, a.n) / per / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main()
