#!/bin/sh
# Builds libbmoe_ops.so with AddressSanitizer + UBSan and runs tests/test_custom_ops.py and
# tests/test_op_hardening.py (hostile attributes, angle files, sizes near INT64_MAX) against
# it. Python itself is not instrumented, so libasan is preloaded. Any sanitizer report aborts
# the run (halt_on_error), so a pass means no report.
# Usage: custom_ops/run_sanitized_tests.sh [pytest args...]   (PYTHON=... to pick the interpreter)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-asan"
python=${PYTHON:-python3}

cmake -S "$root/custom_ops" -B "$build" -DBMOE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null

libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
export BMOE_OPS_LIB="$build/libbmoe_ops.so"
export LD_PRELOAD="$libasan $libubsan"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1
export PYTHONPATH="$root:$root/tests${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$python" -m pytest tests/test_custom_ops.py tests/test_op_hardening.py -q -p no:cacheprovider "$@"
