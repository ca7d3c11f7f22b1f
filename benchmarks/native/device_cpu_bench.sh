#!/bin/sh
# TernaryMatMul on a quiet many-core CPU (issue 16 item 3; the GPU machine's host CPU): M=1 decode with the weights
# from DRAM at 1/2/4/8 threads pinned to distinct physical cores, the streaming read measured in the same run,
# exact and act_quant against ORT's fp32 MatMul, and prefill M=128, 4096×4096 against fp32 MatMul
# (benchmarks/bench_decode_bandwidth.py). Needs python3 with numpy and onnxruntime only (bmoe is not installed,
# no network): the library is the prebuilt .carry/libbmoe_ops.so from benchmarks/native/make_carry.sh, or, where it
# does not load (older glibc/libstdc++), one built here with cmake from .carry/ort_include (about 1 min).
# Run from the repository root; writes $OUT/device_cpu_bench.json (every time), .md (tables), .log (stdout, CPU).
# BMOE_BENCH_QUICK=1: small sizes, 1-2 threads (checks the script end to end on any machine).
set -eu
start=$(date +%s)
out=${OUT:-runs/bench/device_cpu}
lib=${BMOE_OPS_LIB:-.carry/libbmoe_ops.so}
[ -f "$lib" ] || { echo "device_cpu_bench: $lib is missing (benchmarks/native/make_carry.sh builds it)" >&2; exit 2; }
mkdir -p "$out"
log="$out/device_cpu_bench.log"
if ! python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib" 2>"$log"; then
  echo "device_cpu_bench: $lib does not load here ($(tail -1 "$log")); building it" >&2
  cmake -S custom_ops -B /tmp/bmoe-build -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$PWD/.carry/ort_include" >/dev/null
  cmake --build /tmp/bmoe-build -j"$(nproc)" --target bmoe_ops >/dev/null
  lib=/tmp/bmoe-build/libbmoe_ops.so
fi
if [ "${BMOE_BENCH_QUICK:-0}" = 1 ]; then
  set -- --threads 1,2 --shapes 4096x1024 --reps 3 --min-set-mib 16 --llc-factor 0.05 --prefill-m 16
else  # about 2-3 min on the 16-core host (building the ~600 MiB weight sets and sessions is most of it)
  set -- --threads 1,2,4,8 --shapes 14336x4096,4096x4096 --reps 7
fi
{ echo "library: $lib"; nproc; lscpu | grep -E 'Model name|Socket|Core|Thread|NUMA node|L2|L3' || true; } >> "$log" 2>&1
left=$((235 - ($(date +%s) - start)))  # the whole script within 4 min; the JSON is rewritten after every cell
BMOE_OPS_LIB=$lib timeout "$left" python3 benchmarks/bench_decode_bandwidth.py "$@" --pin \
  --impls ternary,ternary_aq,fp32 \
  --out "$out/device_cpu_bench.md" --json "$out/device_cpu_bench.json" >> "$log" 2>&1 || {
  rc=$?; tail -20 "$log" >&2; exit $rc; }
tail -30 "$log"
