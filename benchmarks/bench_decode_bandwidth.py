"""TernaryMatMul decode (M=1) at the memory wall: weight bytes per second with the weights NOT in cache,
against a streaming read measured in the same run and against ONNX Runtime's fp32 MatMul and
com.microsoft::MatMulNBits 4-bit; plus prefill (M=128, 4096×4096) against fp32 MatMul.

Weights not in cache: every implementation runs a graph of R nodes with R distinct weight matrices whose total is
at least --llc-factor × the last-level cache (read from sysfs); one session run streams each matrix once, so every
node reads its weights from DRAM. Time per matmul = run time / R. Streaming read: T Python threads taking np.max
of 4 MiB chunks of one large float32 array, claimed from a shared counter (a SIMD reduction that releases the GIL;
faster than np.sum's pairwise summation), the same T as the sessions' intra-op threads.
Paired rounds: a shared host's bandwidth drifts over seconds, so per shape and T the read and every implementation
are timed in turn, --reps rounds (the implementations' order rotating; each timed pass right after an untimed one
on the same threads, as in a decode loop: a pass started on cores left idle ran much slower, read and kernels
alike), and "% of read" is the median over rounds of
each round's GB/s over that round's read, with its min-max. Medians of --reps runs with the min-max spread; the CPU,
the LLC and the threads are printed.

Needs only numpy and onnxruntime (the ONNX models are written by a small protobuf encoder below, so the `onnx`
package is not needed) and libbmoe_ops.so: $BMOE_OPS_LIB, else the installed bmoe_runtime's library.

    BMOE_OPS_LIB=build/libbmoe_ops.so python3 benchmarks/bench_decode_bandwidth.py [--threads 1,2,4,8]
        [--shapes 14336x4096,4096x4096] [--reps 15] [--out runs/bench/decode_bandwidth.md] [--json out.json] [--pin]

Two builds of the library in the same paired rounds: --lib old=path/to/old.so --impls ternary,ternary/old.

--pin runs each thread count T on the last T distinct physical cores (one logical CPU of each, from sysfs), one thread
per core: the calling thread on the first, ORT's T-1 pool threads on the others (session.intra_op_thread_affinities),
and the streaming read's T threads one per core, as a deployment would pin them. Before each timed run quiesce()
waits until ORT's pool threads have stopped spinning (one spinning on a measured core halved a 2-thread read).

Writes a markdown table to stdout and --out (default runs/bench/decode_bandwidth/<host>.md), and with --json every
measured time; never into docs/.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads spin after use; nothing here needs them
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from results import cpu_model  # benchmarks/ is the script's directory; stdlib only

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ a minimal ONNX protobuf writer

FLOAT, UINT8 = 1, 2  # TensorProto.DataType


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(num: int, value) -> bytes:
    """One protobuf field: int → varint, bytes/str → length-delimited."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, arr: np.ndarray) -> bytes:
    code = {np.float32: FLOAT, np.uint8: UINT8}[arr.dtype.type]
    return b"".join(_field(1, d) for d in arr.shape) + _field(2, code) + _field(8, name) + \
        _field(9, np.ascontiguousarray(arr).tobytes())


def _value_info(name: str, elem: int = FLOAT) -> bytes:
    return _field(1, name) + _field(2, _field(1, _field(1, elem)))  # name, TypeProto{tensor_type{elem_type}}


def _attr(name: str, value) -> bytes:
    if isinstance(value, int):
        return _field(1, name) + _field(3, value) + _field(20, 2)  # i, type INT
    return _field(1, name) + _field(4, value) + _field(20, 3)  # s, type STRING


def _node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> bytes:
    return b"".join(_field(1, i) for i in inputs) + b"".join(_field(2, o) for o in outputs) + _field(4, op) + \
        b"".join(_field(5, _attr(k, v)) for k, v in attrs.items()) + (_field(7, domain) if domain else b"")


def model_bytes(nodes: list[bytes], inits: dict[str, np.ndarray], outputs: list[str]) -> bytes:
    graph = b"".join(_field(1, n) for n in nodes) + _field(2, "bench") + \
        b"".join(_field(5, _tensor(k, v)) for k, v in inits.items()) + _field(11, _value_info("A")) + \
        b"".join(_field(12, _value_info(o)) for o in outputs)
    opsets = b"".join(_field(8, _field(1, d) + _field(2, v)) for d, v in (("", 17), ("ai.bmoe", 1),
                                                                           ("com.microsoft", 1)))
    return _field(1, 8) + opsets + _field(7, graph)  # ir_version 8


# ------------------------------------------------------------------------------- environment

def ops_library() -> str:
    env = os.environ.get("BMOE_OPS_LIB")
    if env:
        return env
    sys.path.insert(0, str(REPO))
    from bmoe_runtime.backends import ort_ops  # noqa: E402

    path = ort_ops.library_path()
    if path is None:
        sys.exit("libbmoe_ops.so not found: build it (cmake -S custom_ops -B build) and set BMOE_OPS_LIB")
    return str(path)


def kernel_choice(lib: str) -> dict[str, str] | None:
    """The variant the library's TernaryMatMul picked per mode in this process (its BmoeTernaryKernel), if exported."""
    import ctypes

    try:
        fn = ctypes.CDLL(lib).BmoeTernaryKernel
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return {"exact": fn(0).decode(), "act_quant": fn(1).decode()}


def llc_bytes() -> int:
    """Largest cache of cpu0 by sysfs (the LLC); 32 MiB if unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            best = max(best, int(size[:-1]) * {"K": 1024, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size))
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def physical_cores() -> list[int]:
    """One allowed logical CPU per physical core (the first of its SMT siblings), in CPU order."""
    allowed = sorted(os.sched_getaffinity(0))
    seen, out = set(), []
    for cpu in allowed:
        try:
            sib = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            sib = str(cpu)
        if sib not in seen:
            seen.add(sib)
            out.append(cpu)
    return out


def pin(threads: int, cores: list[int] | None) -> list[int] | None:
    """The last `threads` cores, this (the calling) thread pinned to the first of them; None when not pinning."""
    if not cores:
        return None
    own = cores[-threads:]
    os.sched_setaffinity(0, own[:1])  # pid 0: this thread only
    return own

# ----------------------------------------------------------------------------------- weights

def pack_2bit(trits: np.ndarray) -> np.ndarray:
    """docs/ops.md '2bit': codes 00 → 0, 01 → +1, 10 → −1; trit k at bits 2(k & 3) of byte k >> 2."""
    n, k = trits.shape
    codes = np.where(trits > 0, 1, np.where(trits < 0, 2, 0)).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, -k % 4))).reshape(n, -1, 4)
    return (codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6).astype(np.uint8)


def column(name: str) -> tuple[str, str, str]:
    """(impl, kernel variant, library name) of a column name IMPL[@VARIANT][/LIB], e.g. `ternary@avx2/old`."""
    head, _, lib = name.partition("/")
    impl, _, variant = head.partition("@")
    return impl, variant, lib


def base_impl(name: str) -> str:
    return column(name)[0]


def read_bytes(impl: str, k: int, n: int) -> int:
    """Weight bytes one M=1 product streams."""
    impl = base_impl(impl)
    if impl == "ternary":  # exact M ≤ 4 reads the LUT-repacked weights (ternary.h): 4 B per 18 trits, 16-row groups
        return (n + 15) // 16 * 16 * (-(-k // 18)) * 4
    if impl == "ternary_aq":  # digit rows (ternary.h): 2 bits a trit, in whole 256-trit chunks
        return n * (-(-k // 256)) * 64
    if impl == "fp32":
        return 4 * k * n
    return n * (-(-k // 32)) * (16 + 4)  # MatMulNBits 4-bit: 16 B of codes and a float32 scale per block of 32


def impl_model(impl: str, k: int, n: int, r: int, rng) -> bytes:
    """R nodes of `impl` reading A, each with its own weights (rows rotated: distinct contents, nothing shared)."""
    impl = base_impl(impl)
    nodes, inits = [], {}
    if impl.startswith("ternary"):
        w = pack_2bit(rng.integers(-1, 2, (n, k)).astype(np.int8))
        inits |= {f"W{i}": np.roll(w, i, 0) for i in range(r)}
        inits |= {f"s{i}": rng.random(n).astype(np.float32) for i in range(r)}
        nodes = [_node("TernaryMatMul", ["A", f"W{i}", f"s{i}"], [f"Y{i}"], "ai.bmoe", K=k,
                       act_quant=int(impl == "ternary_aq")) for i in range(r)]
    elif impl == "fp32":
        b = rng.standard_normal((k, n)).astype(np.float32)
        inits |= {f"B{i}": np.roll(b, i, 0) for i in range(r)}
        nodes = [_node("MatMul", ["A", f"B{i}"], [f"Y{i}"]) for i in range(r)]
    else:  # MatMulNBits 4-bit, block 32, accuracy_level 4 (int8 activations: ORT's fast path)
        blocks = -(-k // 32)
        b = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
        inits |= {f"B{i}": np.roll(b, i, 0) for i in range(r)}
        inits |= {f"c{i}": (rng.random(n * blocks) * 0.01).astype(np.float32) for i in range(r)}
        nodes = [_node("MatMulNBits", ["A", f"B{i}", f"c{i}"], [f"Y{i}"], "com.microsoft", K=k, N=n, bits=4,
                       block_size=32, accuracy_level=4) for i in range(r)]
    return model_bytes(nodes, inits, [f"Y{i}" for i in range(r)])


class Graphs(NamedTuple):
    """One column's decode graphs: weights from DRAM (`nodes` distinct weight sets) and in the LLC."""
    dram: bytes
    nodes: int
    llc: bytes
    nodes_llc: int
    bytes: int  # weight bytes one product streams


def decode_graphs(impl: str, k: int, n: int, set_bytes: float, llc: int, rng) -> Graphs:
    """R nodes whose weights total ≥ set_bytes (read from DRAM), and the same kernels with their weights in the LLC
    (rc nodes, ≤ 1/4 of it, repeated): the compute-bound rate, which tells a compute limit from a memory one."""
    per_read = read_bytes(impl, k, n)
    r = max(2, int(-(-set_bytes // per_read)))
    rc = max(1, min(r, int(llc / 4 // per_read)))
    return Graphs(impl_model(impl, k, n, r, rng), r, impl_model(impl, k, n, rc, rng), rc, per_read)


def session(model: bytes, threads: int, lib: str, variant: str = "",
            cores: list[int] | None = None) -> ort.InferenceSession:
    """A session on `threads` intra-op threads (with `cores`: its pool threads on cores[1:], one each); `variant`
    forces the ops' kernel variant (BMOE_KERNEL is read by the library when the session creates its kernels)."""
    prev = os.environ.get("BMOE_KERNEL")
    if variant:
        os.environ["BMOE_KERNEL"] = variant
    try:
        return _session(model, threads, lib, cores)
    finally:
        if variant:
            os.environ.pop("BMOE_KERNEL") if prev is None else os.environ.__setitem__("BMOE_KERNEL", prev)


def _session(model: bytes, threads: int, lib: str, cores: list[int] | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if cores and threads > 1:  # ORT numbers logical processors from 1
        so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in cores[1:]))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def timed(fn, reps: int) -> list[float]:
    quiesce()
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def quiesce(limit: float = 1.0) -> None:
    """Wait until this process's threads are idle: ORT's pool threads spin for tens of ms after a run, on the cores
    the next measurement runs on (halving a 2-thread read). The process's CPU clock, not os.times(): that counts
    in 10 ms ticks, so a spinning thread often showed no change over 5 ms."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        c0 = time.process_time()
        time.sleep(0.005)
        if time.process_time() - c0 < 0.0005:
            return


def stream_read_gbs(buf: np.ndarray, threads: int, cores: list[int] | None = None) -> float:
    """GB/s of one pass over `buf` by T threads (with `cores`, thread i on cores[i]) taking np.max (a SIMD reduction
    that releases the GIL) of 4 MiB chunks claimed in order from a shared counter, released together by a barrier.
    Claimed, as the kernels' work is: with a fixed split the last of T threads to start set the time (Python
    starts them one after another), which left the read below ORT's own MatMul at 8 threads. The caller decides
    whether the process must be idle first (quiesce)."""
    chunks = np.array_split(buf, max(threads, buf.nbytes >> 22))
    claims = itertools.count()  # next() on it is atomic under the GIL
    start = threading.Barrier(threads + 1)

    def read(core: int | None) -> None:
        if core is not None:
            os.sched_setaffinity(0, [core])
        start.wait()
        for i in claims:
            if i >= len(chunks):
                return
            np.max(chunks[i])
    ts = [threading.Thread(target=read, args=(cores[i] if cores else None,)) for i in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return buf.nbytes / (time.perf_counter() - t0) / 1e9


def fmt(values: list[float], scale: float = 1.0) -> str:
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.1f} ({v[0]:.1f}–{v[-1]:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2,4,8", help="intra-op thread counts (capped at the CPUs)")
    ap.add_argument("--shapes", default="14336x4096,4096x4096", help="K×N of the decode matmuls")
    ap.add_argument("--impls", default="ternary,ternary_aq,fp32,nbits4",
                    help="ternary (exact), ternary_aq (act_quant=1), fp32 (MatMul), nbits4 (MatMulNBits); "
                         "ternary@avx2 etc. force a kernel variant (BMOE_KERNEL) for that column, ternary/NAME "
                         "runs it with the library --lib NAME=PATH (builds compared in the same paired rounds)")
    ap.add_argument("--lib", action="append", default=[], metavar="NAME=PATH",
                    help="another build of libbmoe_ops.so, for the columns IMPL/NAME")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--llc-factor", type=float, default=2.0, help="weight set size per implementation, × the LLC")
    ap.add_argument("--min-set-mib", type=float, default=256)
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write every measured time here")
    ap.add_argument("--pin", action="store_true", help="run T threads on T distinct physical cores")
    ap.add_argument("--prefill-m", type=int, default=128)
    args = ap.parse_args()

    lib = ops_library()
    libs = {name: path for name, _, path in (x.partition("=") for x in args.lib)}
    if not all(libs.values()):
        ap.error("--lib takes NAME=PATH")

    def column_session(name: str, model: bytes, t: int, own: list[int] | None) -> ort.InferenceSession:
        _, variant, lib_name = column(name)
        if lib_name and lib_name not in libs:
            sys.exit(f"column {name}: no --lib {lib_name}=PATH")
        return session(model, t, libs[lib_name] if lib_name else lib, variant, own)
    cores = physical_cores() if args.pin else None
    cpus = len(cores) if cores else len(os.sched_getaffinity(0))
    threads = [t for t in (int(x) for x in args.threads.split(",")) if t <= cpus]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    impls = args.impls.split(",")
    llc = llc_bytes()
    set_bytes = max(args.llc_factor * llc, args.min_set_mib * 2**20)
    rng = np.random.default_rng(0)
    pinned = cores[-max(threads):] if cores else None
    head = [f"# TernaryMatMul decode bandwidth — {cpu_model()}",
            f"{cpus} CPUs available, LLC {llc / 2**20:.0f} MiB, weight set per implementation ≥ "
            f"{set_bytes / 2**20:.0f} MiB; onnxruntime {ort.__version__}; library {lib}; "
            f"BMOE_KERNEL={os.environ.get('BMOE_KERNEL', '(auto)')}; {args.reps} runs each, median (min–max); "
            f"threads pinned to physical cores: {pinned or 'no'}", ""]
    print("\n".join(head), flush=True)
    report = {"cpu": cpu_model(), "cpus": cpus, "llc_bytes": llc, "set_bytes": set_bytes, "onnxruntime": ort.__version__,
              "library": lib, "library_sha256": hashlib.sha256(Path(lib).read_bytes()).hexdigest(),
              "libraries": {n: [p, hashlib.sha256(Path(p).read_bytes()).hexdigest()] for n, p in libs.items()},
              "bmoe_kernel": os.environ.get("BMOE_KERNEL", ""), "pinned_cores": pinned,
              "reps": args.reps, "decode": [], "prefill": []}
    t_start = time.perf_counter()

    def save() -> None:  # after every measurement, so that a run cut short by a time limit keeps what it measured
        report["wall_seconds"] = time.perf_counter() - t_start
        report["kernel_choice"] = kernel_choice(lib)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1))

    big = np.ones(int(max(set_bytes, 512 * 2**20)) // 4, np.float32)  # streaming-read buffer

    prefill_lines: list[str] = []
    if not args.no_prefill:  # compute-bound: one weight, in cache; first, as the cheapest part
        k = n = 4096
        pm = args.prefill_m
        prefill_lines = ["", f"Prefill M={pm}, 4096×4096 (weights in cache): ms, median (min–max)", "",
                         "| threads | fp32 MatMul | TernaryMatMul exact | vs fp32 | TernaryMatMul act_quant | vs fp32 |",
                         "|---|---|---|---|---|---|"]
        a = {"A": rng.standard_normal((pm, k)).astype(np.float32)}
        models = {impl: impl_model(impl, k, n, 1, rng) for impl in ("fp32", "ternary", "ternary_aq")}
        for t in threads:
            own = pin(t, cores)
            ms = {i: timed(lambda s=session(m, t, lib, cores=own): s.run(None, a), args.reps)
                  for i, m in models.items()}
            report["prefill"].append({"m": pm, "k": k, "n": n, "threads": t, "seconds": ms})
            save()
            med = {i: statistics.median(v) for i, v in ms.items()}
            prefill_lines.append(f"| {t} | {fmt(ms['fp32'], 1e3)} | {fmt(ms['ternary'], 1e3)} | "
                                 f"{med['fp32'] / med['ternary']:.2f}× | {fmt(ms['ternary_aq'], 1e3)} | "
                                 f"{med['fp32'] / med['ternary_aq']:.2f}× |")

    lines = ["| K×N | threads | stream read GB/s | " + " | ".join(
        f"{i} µs | {i} GB/s | {i} % of read | {i} GB/s in LLC" for i in impls) + " |",
        "|---|---|---|" + "---|---|---|---|" * len(impls)]
    for k, n in shapes:
        a = {"A": rng.standard_normal((1, k)).astype(np.float32)}
        graphs: dict[str, Graphs] = {}
        for impl in impls:
            same = next((g for i, g in graphs.items() if base_impl(i) == base_impl(impl)), None)
            graphs[impl] = same or decode_graphs(impl, k, n, set_bytes, llc, rng)
        for t in threads:
            own = pin(t, cores)
            sessions = {i: column_session(i, graphs[i].dram, t, own) for i in impls}
            for s in sessions.values():
                s.run(None, a)  # first run: allocations, the pool's threads
            stream_read_gbs(big, t, own)  # first pass: the buffer's pages and the threads' start
            read_t: list[float] = []
            times: dict[str, list[float]] = {i: [] for i in impls}
            for rep in range(args.reps):  # paired rounds: the read, then each implementation, order rotating
                # Each timed pass right after an untimed one on the same threads and cores (warm, as in a decode
                # loop), the other sessions' pool threads idle (quiesce) before the pair.
                quiesce()
                stream_read_gbs(big, t, own)
                read_t.append(stream_read_gbs(big, t, own))
                for i in impls[rep % len(impls):] + impls[:rep % len(impls)]:
                    quiesce()
                    sessions[i].run(None, a)
                    t0 = time.perf_counter()
                    sessions[i].run(None, a)
                    times[i].append((time.perf_counter() - t0) / graphs[i].nodes)
            del sessions
            for impl in impls:
                g = graphs[impl]
                per_read, rc = g.bytes, g.nodes_llc
                cached_sess = column_session(impl, g.llc, t, own)
                cached = [x / rc for x in timed(lambda: cached_sess.run(None, a), args.reps)]
                del cached_sess
                ratios = [per_read / x / 1e9 / rd for x, rd in zip(times[impl], read_t)]
                report["decode"].append({"k": k, "n": n, "impl": impl, "threads": t, "nodes": g.nodes,
                                         "bytes": per_read, "seconds_per_product": times[impl],
                                         "stream_read_gbs": read_t, "nodes_in_llc": rc,
                                         "seconds_per_product_in_llc": cached})
                save()
                gbs = [per_read / x / 1e9 for x in times[impl]]
                print(f"{k}x{n} {impl} R={g.nodes} threads={t}: {statistics.median(times[impl]) * 1e6:.1f} "
                      f"µs/matmul, {statistics.median(gbs):.1f} GB/s, {100 * statistics.median(ratios):.0f}% of the "
                      f"read ({statistics.median(read_t):.1f} GB/s); weights in LLC: "
                      f"{per_read / statistics.median(cached) / 1e9:.1f} GB/s", flush=True)
                res_cells = f"{fmt(times[impl], 1e6)} | {fmt(gbs)} | {fmt(ratios, 100)}% | " + \
                    fmt([per_read / x / 1e9 for x in cached])
                if impl == impls[0]:
                    lines.append(f"| {k}×{n} | {t} | {fmt(read_t)} | {res_cells}")
                else:
                    lines[-1] += f" | {res_cells}"
            lines[-1] += " |"
        del graphs

    lines += prefill_lines
    save()
    head[1] += f"; TernaryMatMul variant chosen (exact, act_quant): {report['kernel_choice']}"
    text = "\n".join(head + lines) + "\n"
    print("\n" + "\n".join(lines))
    out = args.out or REPO / "runs" / "bench" / "decode_bandwidth" / f"{platform.node() or 'host'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
