"""Initializer bytes, kept out of the ONNX proto and written one tensor at a time.

The captured program's initializers are the model's own tensors (its parameters, mapped from the
checkpoint, and the packed buffers): serializing them into a proto would copy every weight, and
writing that proto out another time. Instead the proto is built with a placeholder reference for
each large initializer (`defer`); graph rewrites read weights through `DeferredTensors.array`; and
`write_external` streams each remaining initializer into weights.bin / angles.bin (aligned, angle
tables in their own file), releasing it as it goes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from bmoe_runtime.format.manifest import tensor_kind

ALIGN = 64
WEIGHTS_FILE, ANGLES_FILE = "weights.bin", "angles.bin"
INLINE_LIMIT = 4096  # "other" tensors below this many bytes (shape constants) stay inline: shape inference reads them
_PENDING = "<deferred>"  # placeholder location: never written out


def stays_inline(name: str, nbytes: int) -> bool:
    return tensor_kind(name) == "other" and nbytes < INLINE_LIMIT


class DeferredTensors:
    """name → the captured tensor whose bytes a placeholder in the proto stands for."""

    def __init__(self) -> None:
        self._tensors: dict[str, ir.TensorProtocol] = {}

    def defer(self, model: ir.Model) -> None:
        """Swap every initializer that will be external for a placeholder, keeping its tensor here."""
        for name, value in model.graph.initializers.items():
            t = value.const_value
            if t is None or stays_inline(name, t.nbytes):
                continue
            self._tensors[name] = t
            value.const_value = ir.ExternalTensor(_PENDING, None, None, t.dtype, shape=t.shape, name=name)

    def initializer(self, value: np.ndarray, name: str) -> onnx.TensorProto:
        """A new initializer for the proto: a placeholder, `value` kept here, unless it stays inline."""
        if stays_inline(name, value.nbytes):
            return numpy_helper.from_array(value, name)
        self._tensors[name] = ir.Tensor(value, name=name)
        return ir.serde.serialize_tensor(ir.ExternalTensor(_PENDING, None, None, ir.DataType.from_numpy(value.dtype),
                                                           shape=ir.Shape(value.shape), name=name))

    def array(self, t: onnx.TensorProto) -> np.ndarray:
        """An initializer's values: the deferred tensor (a view, no copy) or the proto's own data."""
        deferred = self._tensors.get(t.name)
        return numpy_helper.to_array(t) if deferred is None else deferred.numpy()

    def release(self, name: str) -> None:
        self._tensors.pop(name, None)


def write_external(model: onnx.ModelProto, out: Path, tensors: DeferredTensors) -> None:
    """Write every initializer's bytes, except small shape constants, into weights.bin / angles.bin
    (64-byte aligned) and point the proto at them."""
    files = {WEIGHTS_FILE: open(out / WEIGHTS_FILE, "wb"), ANGLES_FILE: open(out / ANGLES_FILE, "wb")}
    try:
        for t in model.graph.initializer:
            values = np.ascontiguousarray(tensors.array(t))
            kind = tensor_kind(t.name)
            if stays_inline(t.name, values.nbytes):
                continue
            f = files[ANGLES_FILE if kind == "angles" else WEIGHTS_FILE]
            f.write(b"\0" * (-f.tell() % ALIGN))
            start = f.tell()
            f.write(memoryview(values).cast("B"))  # the tensor's bytes, no copy
            tensors.release(t.name)
            _point_at(t, ANGLES_FILE if kind == "angles" else WEIGHTS_FILE, start, values.nbytes)
    finally:
        for f in files.values():
            f.close()


def _point_at(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL
