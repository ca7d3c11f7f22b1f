"""benchmarks/bench_decode_bandwidth.py measures what it says: its streaming read reads every byte once, it waits
for the process's threads to go idle before timing, and a whole (tiny) run writes every cell it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_decode_bandwidth as bench  # noqa: E402


def test_quiesce_waits_until_a_busy_thread_stops():
    """ORT's pool threads spin after a run; a read timed while one spins on its core is halved. os.times() (10 ms
    ticks) often saw no CPU time pass in 5 ms and let the measurement start (the 2-thread "host anomaly")."""
    block = np.ones(1 << 20, np.float32)
    for _ in range(3):
        done = threading.Event()

        def spin() -> None:
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:
                np.max(block)
            done.set()
        t = threading.Thread(target=spin)
        t.start()
        bench.quiesce(limit=5.0)
        assert done.is_set(), "quiesce returned while a thread of the process was still busy"
        t.join()


def test_stream_read_reads_every_chunk_once(monkeypatch):
    buf = np.arange(3 * (1 << 22) // 4 + 1000, dtype=np.float32)  # 3 chunks of 4 MiB and a bit: uneven split
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()
    real_max = np.max

    def counting_max(a):
        with lock:
            seen.append((a.__array_interface__["data"][0], a.nbytes))
        return real_max(a)
    monkeypatch.setattr(np, "max", counting_max)
    assert bench.stream_read_gbs(buf, 3) > 0
    assert sum(n for _, n in seen) == buf.nbytes
    assert len({p for p, _ in seen}) == len(seen), "a chunk was read twice"


def test_a_tiny_run_writes_every_cell(tmp_path):
    """Two thread counts, one shape, a second build of the library as its own column: every cell is in the JSON
    with one streaming read and one time per round, and the markdown table has a row per thread count."""
    lib = bench.ops_library()
    out, js = tmp_path / "t.md", tmp_path / "t.json"
    env = dict(os.environ, BMOE_OPS_LIB=lib)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_decode_bandwidth.py"), "--threads", "1,2", "--shapes",
         "300x40", "--reps", "2", "--no-prefill", "--impls", "ternary,ternary_aq,ternary_aq/again,fp32",
         "--lib", f"again={lib}", "--min-set-mib", "1", "--llc-factor", "0", "--out", str(out), "--json", str(js)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(js.read_text())
    threads = [t for t in (1, 2) if t <= report["cpus"]]
    cells = {(c["impl"], c["threads"]): c for c in report["decode"]}
    assert set(cells) == {(i, t) for i in ("ternary", "ternary_aq", "ternary_aq/again", "fp32") for t in threads}
    for c in cells.values():
        assert len(c["stream_read_gbs"]) == 2 and len(c["seconds_per_product"]) == 2
        assert all(x > 0 for x in c["stream_read_gbs"] + c["seconds_per_product"] + c["seconds_per_product_in_llc"])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 300×40 |")]
    assert len(rows) == len(threads)


@pytest.mark.parametrize("impl,expected", [("ternary", 16 * 17 * 4), ("ternary_aq", 16 * 128), ("fp32", 4 * 300 * 16)])
def test_read_bytes_are_the_layout_a_product_streams(impl, expected):
    """K=300, N=16: the LUT layout (17 dwords of 18 trits a row, 16-row groups), digit rows (2 chunks of 64 B), fp32."""
    assert bench.read_bytes(impl, 300, 16) == expected
