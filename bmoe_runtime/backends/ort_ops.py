"""Load the ai.bmoe custom-op library (custom_ops/, docs/ops.md) into onnxruntime."""

from __future__ import annotations

import os
import pathlib
import sys

from bmoe_runtime.errors import BmoeError

LIB_NAME = "libbmoe_ops.so"
# Session config entry read by the library when it is registered: the directory a streamed
# angle_file is confined to (docs/ops.md, "angle_file: confined to the model directory").
MODEL_DIR_KEY = "bmoe.model_dir"
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


def register(sess_options, model_dir: str | os.PathLike | None = None) -> None:
    """Register the ai.bmoe operators on an onnxruntime.SessionOptions. `model_dir`: the
    model's directory, to which streamed angle files are confined (without it, a streamed
    node fails to load); it must be given here, as the library reads it when registered."""
    path = library_path()
    if path is None:
        looked = ", ".join(str(p) for p in _candidates())
        raise BmoeError(f"{LIB_NAME} not found (build it with `pip install -e .` or "
                        f"`cmake -S custom_ops -B build && cmake --build build`); looked in: {looked}")
    if model_dir is not None:
        sess_options.add_session_config_entry(MODEL_DIR_KEY, str(pathlib.Path(model_dir).resolve()))
    try:
        sess_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime reports a bad library as a generic exception type
        raise BmoeError(f"{path} cannot be loaded as the ai.bmoe op library: {str(exc).splitlines()[0][:300]}") \
            from None
