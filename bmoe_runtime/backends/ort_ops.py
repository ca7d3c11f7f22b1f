"""Load the ai.bmoe custom-op library (custom_ops/, docs/ops.md) into onnxruntime."""

from __future__ import annotations

import os
import pathlib
import sys

LIB_NAME = "libbmoe_ops.so"
_PKG_DIR = pathlib.Path(__file__).resolve().parents[1]  # bmoe_runtime/


def _candidates() -> list[pathlib.Path]:
    env = os.environ.get("BMOE_OPS_LIB")
    found = [pathlib.Path(env)] if env else []
    # Wheel install: next to this package. Editable install: scikit-build-core puts
    # the .so under site-packages while the .py files stay in the source tree.
    found.append(_PKG_DIR / "_lib" / LIB_NAME)
    found += [pathlib.Path(p or ".") / "bmoe_runtime" / "_lib" / LIB_NAME for p in sys.path]
    # Development builds: `cmake -S custom_ops -B build*`.
    found += sorted(_PKG_DIR.parent.glob(f"build*/{LIB_NAME}"))
    return found


def library_path() -> pathlib.Path | None:
    """Path of libbmoe_ops.so ($BMOE_OPS_LIB first), or None if it is not built."""
    env = os.environ.get("BMOE_OPS_LIB")
    if env:
        return pathlib.Path(env) if pathlib.Path(env).is_file() else None
    return next((p for p in _candidates() if p.is_file()), None)


def available() -> bool:
    return library_path() is not None


def register(sess_options) -> None:
    """Register the ai.bmoe operators on an onnxruntime.SessionOptions."""
    path = library_path()
    if path is None:
        looked = "\n  ".join(str(p) for p in _candidates())
        raise RuntimeError(
            f"{LIB_NAME} not found (build it with `pip install -e .` or "
            f"`cmake -S custom_ops -B build && cmake --build build`). Looked in:\n  {looked}"
        )
    sess_options.register_custom_ops_library(str(path))
