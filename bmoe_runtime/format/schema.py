"""The schema of manifest.json, and the cross-field rules a JSON Schema cannot say.

A manifest is untrusted input: every number is bounded, every file name is a plain name
inside the model directory (no '/', no '..'), every file has a size and a sha256, and
what the runtime and the planner compute from it (tensor sizes, angle slices, the KV
cache's shape) is checked to add up before anything uses it.
"""

from __future__ import annotations

import math

import jsonschema
import numpy as np

from bmoe_runtime.choices import EXPERT_FORMS, VARIANTS
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.packing import PACKINGS

MAX_FILE_BYTES = 2**40  # 1 TiB: larger than any model this runs, small enough that sums stay exact
MAX_DIM = 2**31
# A plain file name: no separators, not '.' or '..', no leading '-' or '.' (hidden/temporary files).
FILE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$"
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
ANGLE_DTYPES = ("fp32", "fp16", "int8")
KINDS = ("angles", "prototypes", "experts", "router", "shared_projection", "attention", "norms", "embeddings",
         "other")


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


_NAME = {"type": "string", "pattern": FILE_NAME}
_BYTES = _int(0, MAX_FILE_BYTES)
_TEXT = {"type": "string", "maxLength": 1024}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["format", "version", "model", "opset", "kind", "files", "tensors", "bytes_by_kind", "angle_tables"],
    "properties": {
        "format": {"const": "bmoe-export"},
        "version": {"const": 1},
        "model": _NAME,
        "op_domains": {"type": "object", "maxProperties": 16, "additionalProperties": _int(1, 1000)},
        "opset": _int(1, 1000),
        "kind": {"enum": ["lm", "module"]},
        "tokenizer": _NAME,
        "kv_layout": _TEXT,
        "expert_banks": _int(0, 1 << 20),
        "inputs": {"type": "array", "maxItems": 4096, "items": _TEXT},
        "outputs": {"type": "array", "maxItems": 4096, "items": _TEXT},
        "metrics": {"type": "object"},
        "export_options": {
            "type": "object",
            "properties": {"packing": {"enum": list(PACKINGS)}, "angle_dtype": {"enum": list(ANGLE_DTYPES)},
                           "act_quant": {"type": "boolean"}},
        },
        "config": {
            "type": "object",
            "required": ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_experts", "top_k", "max_seq"],
            "properties": {
                "vocab_size": _int(1, 1 << 21), "d_model": _int(1, 1 << 16), "n_layers": _int(1, 1024),
                "n_heads": _int(1, 1024), "d_ff": _int(1, 1 << 18), "n_experts": _int(1, 1 << 16),
                "top_k": _int(1, 1024), "max_seq": _int(1, 1 << 20),
                "variant": {"enum": list(VARIANTS)}, "expert_form": {"enum": list(EXPERT_FORMS)},
                "router_noise": {"type": "number", "minimum": 0, "maximum": 1e6},
                "balance_weight": {"type": "number", "minimum": 0, "maximum": 1e6},
                "per_row_scale": {"type": "boolean"},
            },
        },
        "files": {
            "type": "object", "minProperties": 1, "maxProperties": 1024, "propertyNames": {"pattern": FILE_NAME},
            "additionalProperties": {
                "type": "object", "required": ["bytes", "sha256"], "additionalProperties": False,
                "properties": {"bytes": _BYTES, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            },
        },
        "tensors": {
            "type": "object", "maxProperties": 1 << 20, "propertyNames": {"maxLength": 1024},
            "additionalProperties": {
                "type": "object", "required": ["kind", "dtype", "shape", "file", "offset", "bytes"],
                "properties": {"kind": {"enum": list(KINDS)}, "dtype": {"enum": list(DTYPES)},
                               "shape": {"type": "array", "maxItems": 8, "items": _int(0, MAX_DIM)},
                               "file": _NAME, "offset": _BYTES, "bytes": _BYTES},
            },
        },
        "bytes_by_kind": {"type": "object", "propertyNames": {"enum": list(KINDS)}, "additionalProperties": _BYTES},
        "angle_tables": {
            "type": "array", "maxItems": 1 << 16,
            "items": {"type": "object", "required": ["tensor", "experts", "expert_bytes"],
                      "properties": {"tensor": {"type": "string", "maxLength": 1024}, "experts": _int(1, 1 << 16),
                                     "expert_bytes": _int(1, MAX_FILE_BYTES)}},
        },
        # a planned directory (bmoe plan --write; runtime/planned_dir.py): these tables' ButterflyRotate nodes
        # stream from the angle file with this many experts cached, their initializers gone from the graph
        "streamed": {
            "type": "object", "required": ["cache_slots", "device", "budget_bytes", "planned_peak_bytes"],
            "properties": {
                "cache_slots": {"type": "object", "minProperties": 1, "maxProperties": 1 << 16,
                                "propertyNames": {"maxLength": 1024}, "additionalProperties": _int(1, 1 << 16)},
                "device": _TEXT, "runtime": _TEXT, "budget_bytes": _BYTES, "planned_peak_bytes": _BYTES,
                "lookahead": {"type": "boolean"},
            },
        },
    },
    "if": {"properties": {"kind": {"const": "lm"}}},
    "then": {"required": ["config", "tokenizer"]},
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def check_manifest(m: dict, where: str) -> None:
    """Raise one BmoeError naming the first problem, or return: the schema, then the cross-field rules."""
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(m))
    if error is not None:
        at = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BmoeError(f"{where}: {at}: {_short(error.message)}")
    problem = _inconsistency(m)
    if problem:
        raise BmoeError(f"{where}: {problem}")


def _inconsistency(m: dict) -> str | None:
    files, tensors = m["files"], m["tensors"]
    for field in ("model", "tokenizer"):
        if field in m and m[field] not in files:
            return f"{field} {m[field]!r} is not among the listed files (so it would not be verified)"
    by_kind: dict[str, int] = {}
    for name, t in tensors.items():
        if t["file"] not in files:
            return f"tensor {_short(name)} is in {t['file']!r}, which is not among the listed files"
        if t["offset"] + t["bytes"] > files[t["file"]]["bytes"]:
            return f"tensor {_short(name)} ends past the end of {t['file']}"
        if math.prod(t["shape"]) * np.dtype(t["dtype"]).itemsize != t["bytes"]:
            return f"tensor {_short(name)}: shape {t['shape']} of {t['dtype']} is not {t['bytes']} bytes"
        by_kind[t["kind"]] = by_kind.get(t["kind"], 0) + t["bytes"]
    if {k: v for k, v in m["bytes_by_kind"].items() if v} != by_kind:
        return "bytes_by_kind does not add up from the tensors"
    for a in m["angle_tables"]:
        t = tensors.get(a["tensor"])
        if t is None or t["kind"] != "angles" or len(t["shape"]) != 3:
            return f"angle table {_short(a['tensor'])} is not an [experts, stages, pairs] angles tensor"
        if t["shape"][0] != a["experts"] or a["experts"] * a["expert_bytes"] != t["bytes"]:
            return f"angle table {_short(a['tensor'])}: experts/expert_bytes do not match its tensor"
    experts = {a["tensor"]: a["experts"] for a in m["angle_tables"]}
    for name, slots in m.get("streamed", {}).get("cache_slots", {}).items():
        if name not in experts or slots > experts[name]:
            return f"streamed table {_short(name)} is not an angle table, or caches more than its experts"
    if m["kind"] == "lm":
        return _lm_inconsistency(m["config"], tensors, m["angle_tables"])
    return None


def _lm_inconsistency(cfg: dict, tensors: dict, angle_tables: list) -> str | None:
    if cfg["d_model"] % cfg["n_heads"]:
        return f"config: d_model {cfg['d_model']} is not divisible by n_heads {cfg['n_heads']}"
    if cfg["top_k"] > cfg["n_experts"]:
        return f"config: top_k {cfg['top_k']} exceeds n_experts {cfg['n_experts']}"
    if any(a["experts"] != cfg["n_experts"] for a in angle_tables):
        return f"an angle table's experts differ from config n_experts {cfg['n_experts']}"
    # The embeddings fix what the graph can index: positions up to max_seq, tokens up to vocab_size; quantized
    # tables (tok_emb.weight_q8, its _scales, ...) have the same rows.
    for stem, rows in (("tok_emb.weight", "vocab_size"), ("pos_emb.weight", "max_seq")):
        for name, t in tensors.items():
            if stem in name and t["shape"][:1] != [cfg[rows]]:  # rows: columns may be packed
                return f"tensor {_short(name)} has shape {t['shape']}: its rows are not config {rows} {cfg[rows]}"
    return None


def _short(text: str, limit: int = 160) -> str:
    """Messages quote the offending value, which may be megabytes long."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"
