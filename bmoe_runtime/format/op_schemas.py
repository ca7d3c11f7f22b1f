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


def _opt(name: str, kind, doc: str) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, kind, doc, required=False)


def _schemas() -> list[OpSchema]:
    rotate = OpSchema(
        "ButterflyRotate", DOMAIN, VERSION,
        doc="Per-row butterfly rotation B(θ_e) x (or Bᵀ x); see docs/ops.md.",
        inputs=[_FP("X", "T"), _FP("angles", "TA", param_option=_OPTIONAL),  # omitted in the streamed form
                _FP("expert_index", "tensor(int64)", param_option=_OPTIONAL),
                _FP("angle_scale", "tensor(float)", param_option=_OPTIONAL)],
        outputs=[_FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations"),
                          ("TA", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "angles")],
        attributes=[_attr("transpose", 0, "0: B, 1: Bᵀ"),
                    # streamed form: angles read per expert from a file into a cache
                    _opt("angle_file", OpSchema.AttrType.STRING,
                         "file holding the [E, S, P/2] angle table, inside the model directory"),
                    _opt("angle_file_size", OpSchema.AttrType.INT, "the file's exact size in bytes"),
                    _opt("angle_offset", OpSchema.AttrType.INT, "byte offset of expert 0's slice"),
                    _opt("angle_experts", OpSchema.AttrType.INT, "E"),
                    _opt("angle_dtype", OpSchema.AttrType.INT, "TensorProto code: 1 float, 10 float16, 3 int8"),
                    _opt("cache_slots", OpSchema.AttrType.INT, "experts' tables kept, ≥ 1"),
                    _opt("cache_key", OpSchema.AttrType.STRING, "nodes with the same key share one cache")])
    prefetch = OpSchema(
        "AnglePrefetch", DOMAIN, VERSION,
        doc="Router look-ahead: load expert_ids' streamed angles into the cache of cache_key; Y = X. "
            "See docs/ops.md.",
        inputs=[_FP("X", "T"), _FP("expert_ids", "tensor(int64)"),
                _FP("angle_scale", "tensor(float)", param_option=_OPTIONAL)],
        outputs=[_FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "passed through")],
        attributes=[OpSchema.Attribute("angle_file", OpSchema.AttrType.STRING, "as ButterflyRotate's", required=True),
                    OpSchema.Attribute("angle_file_size", OpSchema.AttrType.INT, "as ButterflyRotate's", required=True),
                    _opt("angle_offset", OpSchema.AttrType.INT, "as ButterflyRotate's"),
                    OpSchema.Attribute("angle_experts", OpSchema.AttrType.INT, "E", required=True),
                    OpSchema.Attribute("angle_dtype", OpSchema.AttrType.INT, "as ButterflyRotate's", required=True),
                    OpSchema.Attribute("cache_slots", OpSchema.AttrType.INT, "as ButterflyRotate's", required=True),
                    OpSchema.Attribute("cache_key", OpSchema.AttrType.STRING, "the shared cache to fill",
                                       required=True)])
    matmul = OpSchema(
        "TernaryMatMul", DOMAIN, VERSION,
        doc="A · (scale ⊙ T)ᵀ with packed trits T; see docs/ops.md.",
        inputs=[_FP("A", "T"), _FP("W_packed", "tensor(uint8)"), _FP("scale", "T")],
        outputs=[_FP("Y", "T")],
        type_constraints=[("T", ["tensor(float)"], "activations")],
        attributes=[OpSchema.Attribute("K", OpSchema.AttrType.INT, "reduction length", required=True),
                    _attr("packing", "2bit", "2bit or base3"),
                    _attr("act_quant", 0, "1: int8 activations")])
    return [rotate, matmul, prefetch]


def register() -> None:
    for schema in _schemas():
        try:
            onnx.defs.get_schema(schema.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)
