"""ONNX schemas of the ai.bmoe ops (docs/ops.md), so onnx.checker, shape inference and
onnxscript know them. Registered once per process."""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

DOMAIN, VERSION = "ai.bmoe", 1

_FP = OpSchema.FormalParameter
_OPTIONAL = OpSchema.FormalParameterOption.Optional


def _attr(name: str, value, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, onnx.helper.make_attribute(name, value), doc)


def _schemas() -> list[OpSchema]:
    rotate = OpSchema(
        "ButterflyRotate", DOMAIN, VERSION,
        doc="Per-row butterfly rotation B(θ_e) x (or Bᵀ x); see docs/ops.md.",
        inputs=[_FP("X", "T"), _FP("angles", "TA"),
                _FP("expert_index", "tensor(int64)", param_option=_OPTIONAL),
                _FP("angle_scale", "tensor(float)", param_option=_OPTIONAL)],
        outputs=[_FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"),
                          ("TA", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "angles")],
        attributes=[_attr("transpose", 0, "0: B, 1: Bᵀ")])
    matmul = OpSchema(
        "TernaryMatMul", DOMAIN, VERSION,
        doc="A · (scale ⊙ T)ᵀ with packed trits T; see docs/ops.md.",
        inputs=[_FP("A", "T"), _FP("W_packed", "tensor(uint8)"), _FP("scale", "T")],
        outputs=[_FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations")],
        attributes=[OpSchema.Attribute("K", OpSchema.AttrType.INT, "reduction length", required=True),
                    _attr("packing", "2bit", "2bit or base3"),
                    _attr("act_quant", 0, "1: int8 activations")])
    return [rotate, matmul]


def register() -> None:
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
