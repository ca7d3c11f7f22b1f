#!/bin/sh
# Cross-builds custom_ops for aarch64 Linux, runs the C++ test driver under
# qemu-aarch64 against ONNX Runtime's aarch64 library from PyPI, once per kernel
# variant, cross-builds the C example (examples/c/bmoe_generate.c) and runs it on the
# bundled model, and prints "N passed, N failed" (docs/aarch64.md).
#
# Needs: g++-aarch64-linux-gnu and qemu-user (Debian: apt-get install -y
# g++-aarch64-linux-gnu qemu-user), cmake, unzip, and a Python with numpy, onnx,
# numba and pip (the project's venv) for the x86 references.
#
# Usage: custom_ops/aarch64/run_qemu_tests.sh
#   PYTHON=/tmp/venv/bin/python  interpreter for gen_cases.py and pip (default: python3)
#   ORT_VERSION=1.22.0           onnxruntime wheel to take libonnxruntime.so from
#                                (1.21.0 also works, but only on CPUs with FP16: its
#                                library executes FP16 instructions at load time)
#   ORT_SHA256=...               sha256 of its libonnxruntime.so.1.x (pinned for 1.22.0; required
#                                for any other version: the downloaded library is always checked)
#   EXAMPLE_PROMPT=ROMEO:        prompt of the C example run; EXAMPLE_N_NEW=8 tokens it generates
#   BUILD=build-aarch64          build directory (relative to the repository root)
#   QEMU_CPU=max                 CPU model with dotprod; QEMU_CPU_NODP=cortex-a72 one without
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
ort_version=${ORT_VERSION:-1.22.0}
# sha256 of libonnxruntime.so.1.22.0 in onnxruntime-1.22.0-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl
ort_sha256_1_22_0=50a440a8a15515eef4f48ae6471c361032cc162769045ebf662099396642259c
if [ "$ort_version" = 1.22.0 ]; then ort_sha256=${ORT_SHA256:-$ort_sha256_1_22_0}; else ort_sha256=${ORT_SHA256:-}; fi
[ -n "$ort_sha256" ] || { echo "run_qemu_tests.sh: set ORT_SHA256 to the sha256 of libonnxruntime.so.$ort_version" >&2; exit 2; }
example_prompt=${EXAMPLE_PROMPT:-ROMEO:}
example_n_new=${EXAMPLE_N_NEW:-8}
build=$root/${BUILD:-build-aarch64}
sysroot=${BMOE_CROSS_SYSROOT:-/usr/aarch64-linux-gnu}
cpu=${QEMU_CPU:-max}
cpu_nodp=${QEMU_CPU_NODP:-cortex-a72}

for tool in aarch64-linux-gnu-g++ aarch64-linux-gnu-gcc qemu-aarch64 cmake unzip sha256sum; do
  command -v "$tool" >/dev/null || { echo "run_qemu_tests.sh: $tool not found (see docs/aarch64.md)" >&2; exit 2; }
done
mkdir -p "$build"

# 1. ONNX Runtime for aarch64: capi/libonnxruntime.so.1.x of the manylinux wheel.
wheel_dir=$build/_ort_wheel/$ort_version
ort_lib=$wheel_dir/onnxruntime/capi/libonnxruntime.so.$ort_version
if [ ! -f "$ort_lib" ]; then
  echo "== fetching onnxruntime $ort_version (manylinux aarch64 wheel)"
  rm -rf "$wheel_dir" && mkdir -p "$wheel_dir"
  "$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 "onnxruntime==$ort_version" -d "$wheel_dir"
  unzip -q -o "$wheel_dir"/onnxruntime-*.whl 'onnxruntime/capi/libonnxruntime.so*' -d "$wheel_dir"
  rm -f "$wheel_dir"/onnxruntime-*.whl
fi
# Checked on every run, so a tampered or truncated download (or cached copy) never runs.
echo "$ort_sha256  $ort_lib" | sha256sum -c --quiet - || {
  echo "run_qemu_tests.sh: $ort_lib does not have the pinned sha256 $ort_sha256" >&2; exit 1; }

# 2. Cross-build (library + drivers). Reuse the C API headers of an x86 build if
# there are some; else OrtHeaders.cmake fetches them.
if [ -z "${ORT_INCLUDE_DIR:-}" ]; then
  for d in "$build/_ort_headers/root/usr/include/onnxruntime" \
           "$root"/build*/_ort_headers/root/usr/include/onnxruntime; do
    [ -f "$d/onnxruntime_c_api.h" ] && export ORT_INCLUDE_DIR="$d" && break
  done
fi
echo "== cross-building into $build"
cmake -S "$root/custom_ops" -B "$build" \
  -DCMAKE_TOOLCHAIN_FILE="$root/custom_ops/toolchains/aarch64-linux-gnu.cmake" \
  -DBMOE_BUILD_DRIVER=ON -DORT_LIBRARY="$ort_lib" >/dev/null
cmake --build "$build" -j"$(nproc)" 2>&1 | grep -E "error|warning: .*_neon|warning: .*dotprod" || true
[ -x "$build/bmoe_ops_driver" ] && [ -x "$build/bmoe_ops_driver_static" ] || { echo "build failed" >&2; exit 1; }

# 3. Test cases with x86 references (ops: tests/ops_reference.py; LM: Numba runtime).
echo "== generating cases (x86 references)"
"$python" "$root/custom_ops/aarch64/gen_cases.py" "$build/cases"

# 4. Runs under qemu-aarch64.
qemu() { qemu-aarch64 -L "$sysroot" "$@"; }
total_pass=0 total_fail=0
summary=""
record() {  # label passed failed
  total_pass=$((total_pass + $2)) total_fail=$((total_fail + $3))
  summary="$summary$(printf '  %-50s %4s passed, %s failed' "$1" "$2" "$3")
"
}
run_cases() {  # label qemu-cpu kernel driver [driver args]
  label=$1 qcpu=$2 kernel=$3
  shift 3
  echo "== $label"
  out=$(BMOE_KERNEL=$kernel qemu -cpu "$qcpu" "$@" "$build/cases" 2>&1) || true
  echo "$out" | grep -E "^(cpu|onnxruntime|FAIL)" || true
  line=$(echo "$out" | grep -E "^[0-9]+ passed, [0-9]+ failed$" | tail -n1)
  if [ -z "$line" ]; then
    echo "$out" | tail -n5
    record "$label" 0 1  # crashed
  else
    echo "$line"
    record "$label" "$(echo "$line" | cut -d' ' -f1)" "$(echo "$line" | cut -d' ' -f3)"
  fi
}
check() {  # label condition-output-grep-pattern output
  if echo "$3" | grep -qE "$2"; then record "$1" 1 0; else echo "CHECK FAILED: $1"; echo "$3"; record "$1" 0 1; fi
}

for k in scalar neon dotprod; do
  run_cases "-cpu $cpu BMOE_KERNEL=$k" "$cpu" "$k" "$build/bmoe_ops_driver"
done
run_cases "-cpu $cpu auto" "$cpu" "" "$build/bmoe_ops_driver"
run_cases "-cpu $cpu_nodp auto (no dotprod)" "$cpu_nodp" "" "$build/bmoe_ops_driver"
run_cases "-cpu $cpu static, RegisterCustomOpsUsingFunction" "$cpu" "" "$build/bmoe_ops_driver_static" --register func
run_cases "-cpu $cpu static, BmoeRegisterCustomOps" "$cpu" "" "$build/bmoe_ops_driver_static" --register direct

echo "== dispatch checks"
probe=$(qemu -cpu "$cpu" "$build/bmoe_ops_driver" --probe "$build/cases" 2>&1 || true)
echo "$probe" | grep -E "^(cpu|kernel)" || echo "$probe" | tail -n2
check "probe -cpu $cpu: asimddp in AT_HWCAP" "asimddp=1" "$probe"
check "probe -cpu $cpu: dotprod available" "^kernel dotprod: available" "$probe"
probe=$(qemu -cpu "$cpu_nodp" "$build/bmoe_ops_driver" --probe "$build/cases" 2>&1 || true)
echo "$probe" | grep -E "^(cpu|kernel)" || echo "$probe" | tail -n2
check "probe -cpu $cpu_nodp: neon available" "^kernel neon: available" "$probe"
check "probe -cpu $cpu_nodp: dotprod refused" "^kernel dotprod: unavailable: .*BMOE_KERNEL=dotprod is not available" "$probe"
# qemu translates (hence executes) sdot only if the dotprod kernel really runs.
# Its 7.2 disassembler prints sdot as .byte, so match the encoding 0x4e8094xx..
log=$build/qemu_in_asm.log
sdot='^0x[0-9a-f]+:  4e[89][0-9a-f]9[4-7][0-9a-f]{2}  '
for k in dotprod neon; do
  rm -f "$log"
  BMOE_KERNEL=$k qemu -cpu "$cpu" -d in_asm -D "$log" "$build/bmoe_ops_driver" --filter probe "$build/cases" >/dev/null 2>&1 || true
  n=$(grep -cE "$sdot" "$log" || true)
  echo "sdot instructions translated with BMOE_KERNEL=$k: $n"
  if [ "$k" = dotprod ]; then check "sdot executed with BMOE_KERNEL=dotprod" "^[1-9]" "$n"
  else check "no sdot with BMOE_KERNEL=neon" "^0$" "$n"; fi
done
rm -f "$log"

# 5. The C example (ORT C API + libbmoe_ops.so, greedy with the KV cache, no Python on the
# target): cross-compiled against the ORT C header libbmoe_ops was built with and the aarch64
# libonnxruntime; tests/test_aarch64.py compares its tokens with the Numba runtime's.
echo "== C example (examples/c/bmoe_generate.c)"
example_dir=$build/example
mkdir -p "$example_dir" && rm -f "$example_dir/bmoe_generate"
ln -sf "$ort_lib" "$example_dir/libonnxruntime.so.1"  # the soname; the wheel ships only the versioned file
ort_include=$("$python" -c "from bmoe_runtime.backends import native; print(native.ort_include_dir() or '')")
out=$(aarch64-linux-gnu-gcc -O2 -std=c11 -Wall -Wextra -Werror -o "$example_dir/bmoe_generate" \
        "$root/examples/c/bmoe_generate.c" -I"$ort_include" "$example_dir/libonnxruntime.so.1" \
        -Wl,-rpath,"$example_dir" 2>&1) && [ -n "$ort_include" ] || out="cross-compile failed (ORT header: '$ort_include'): $out"
model=$("$python" -c "from bmoe_runtime import default_model_dir; print(default_model_dir())")
if [ -x "$example_dir/bmoe_generate" ] && [ -n "$ort_include" ]; then
  t0=$(date +%s%N)
  out=$(qemu -cpu "$cpu" "$example_dir/bmoe_generate" "$model" "$build/libbmoe_ops.so" \
          "$example_prompt" "$example_n_new" 2>&1) || out="exit status $?: $out"
  t1=$(date +%s%N)
  echo "$out"
  echo "C example: $example_n_new tokens after '$example_prompt' in $(( (t1 - t0) / 1000000 )) ms under qemu"
fi
check "C example runs under qemu (-cpu $cpu)" "^tokens:( [0-9]+){$example_n_new}\$" "$out"

echo "== summary (onnxruntime $ort_version aarch64 under $(qemu-aarch64 --version | head -n1))"
printf '%s' "$summary"
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
