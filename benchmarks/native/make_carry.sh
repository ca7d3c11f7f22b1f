#!/bin/sh
# Fills .carry/ (git-ignored) for benchmarks/native/device_cpu_bench.sh on a host without network:
#   .carry/libbmoe_ops.so   this machine's Release build (x86-64), used as is where it loads;
#   .carry/ort_include/     the ORT C API headers it was built against, so that the host can build the library
#                           itself (cmake, g++) where the prebuilt one does not load (an older glibc/libstdc++).
# Prints the library's sha256 and the newest glibc / libstdc++ symbol versions it needs.
# The ORT headers come from ORT_INCLUDE_DIR if set, else they are fetched into the build directory once.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build="$root/build-carry"
cmake -S "$root/custom_ops" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target bmoe_ops >/dev/null
mkdir -p "$root/.carry"
cp "$build/libbmoe_ops.so" "$root/.carry/libbmoe_ops.so"
headers=${ORT_INCLUDE_DIR:-$build/_ort_headers/root/usr/include/onnxruntime}  # as custom_ops/cmake/OrtHeaders.cmake
rm -rf "$root/.carry/ort_include" && cp -r "$headers" "$root/.carry/ort_include"
lib="$root/.carry/libbmoe_ops.so"
echo "$lib: $(sha256sum "$lib" | cut -d' ' -f1)"
echo "needs: $(objdump -p "$lib" | awk '/NEEDED/ {printf "%s ", $2}')"
echo "newest symbol versions: $(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)" \
  "$(objdump -T "$lib" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)"
echo "device command: carry [\".carry\"], run: OUT=\$OUT sh benchmarks/native/device_cpu_bench.sh"
