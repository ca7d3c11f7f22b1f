"""Measure the `native` runtime overhead: peak RSS of a C program embedding ONNX Runtime + libbmoe_ops.

Builds overhead.c against the pip-installed onnxruntime's libonnxruntime and the ORT C headers that the
op library's build fetched (custom_ops/cmake), runs it --repeat times, prints the median and spread.
The planner's NATIVE_OVERHEAD constant (bmoe_runtime/planning/planner.py) comes from this script.

usage: python benchmarks/native/native_overhead.py --include build-dir/_ort_headers/root/usr/include/onnxruntime
"""

from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import tempfile
from pathlib import Path

import onnx
import onnxruntime
from onnx import TensorProto, helper

from bmoe_runtime.backends import ort_ops

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--include", required=True, help="directory holding onnxruntime_c_api.h")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    lib = ort_ops.library_path()
    if lib is None:
        raise SystemExit("libbmoe_ops.so is not built")
    ort_lib = sorted(glob.glob(str(Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime.so*")))[0]
    with tempfile.TemporaryDirectory() as tmp:
        exe, model = Path(tmp) / "overhead", Path(tmp) / "identity.onnx"
        (Path(tmp) / "libonnxruntime.so.1").symlink_to(ort_lib)  # the wheel ships only the versioned file
        subprocess.run(["cc", "-O2", "-o", exe, HERE / "overhead.c", f"-I{args.include}", ort_lib,
                        f"-Wl,-rpath,{tmp}"], check=True)
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), model)
        mib = [int(subprocess.run([exe, lib, model], check=True, capture_output=True, text=True).stdout) / 2**20
               for _ in range(args.repeat)]
    print(f"native overhead (C app + ORT {onnxruntime.__version__} + libbmoe_ops, 1 thread): median "
          f"{statistics.median(mib):.1f} MiB, min {min(mib):.1f}, max {max(mib):.1f} over {len(mib)} runs")


if __name__ == "__main__":
    main()
