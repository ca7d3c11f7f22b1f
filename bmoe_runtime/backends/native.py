"""Where a native app finds what it links: ORT's C header (shipped with bmoe), libonnxruntime, libbmoe_ops.

`python -m bmoe_runtime.backends.native` prints the CMake flags for examples/c.
"""

from __future__ import annotations

import glob
from pathlib import Path

from bmoe_runtime.backends import ort_ops

HEADER = "onnxruntime_c_api.h"


def ort_include_dir() -> Path | None:
    """The ORT C API header the op library was built against (installed beside libbmoe_ops.so)."""
    lib = ort_ops.library_path()
    candidates = [lib.parent / "include"] if lib else []
    # a development build (cmake -S custom_ops -B build*) keeps the fetched headers in its build tree
    root = Path(__file__).resolve().parents[2]
    candidates += [Path(p) for p in sorted(glob.glob(str(root / "build*/_ort_headers/root/usr/include/onnxruntime")))]
    return next((d for d in candidates if (d / HEADER).is_file()), None)


def ort_library() -> Path | None:
    """libonnxruntime from the pip-installed onnxruntime package (the wheel ships only the versioned file)."""
    import onnxruntime

    found = sorted(glob.glob(str(Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime.so*")))
    return Path(found[0]) if found else None


if __name__ == "__main__":
    print(f"-DORT_INCLUDE_DIR={ort_include_dir()} -DORT_LIBRARY={ort_library()}  # libbmoe_ops: "
          f"{ort_ops.library_path()}")
