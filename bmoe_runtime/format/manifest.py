"""manifest.json of an exported model: what is in the directory, how big, and its checksums.

Written by the exporter, verified by every runtime before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from bmoe_runtime.format import op_schemas
from bmoe_runtime.errors import BmoeError

MANIFEST, FORMAT, VERSION = "manifest.json", "bmoe-export", 1

_KINDS = (  # first match wins
    ("angles", ("_angles", "_angle_scale")),
    ("prototypes", ("w_packed", "w_scale")),
    ("experts", ("expert_weight",)),
    ("router", (".router.",)),
    ("shared_projection", (".proj.",)),
    ("attention", (".attn.",)),
    ("norms", ("ln_",)),
    ("embeddings", ("tok_emb", "pos_emb")),
)


def tensor_kind(name: str) -> str:
    for kind, marks in _KINDS:
        if any(m in name for m in marks):
            return kind
    return "other"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _external(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def build_manifest(out: Path, model: onnx.ModelProto, meta: dict) -> dict:
    tensors, by_kind, angle_tables = {}, {}, []
    for t in model.graph.initializer:
        ext = _external(t)
        if not ext:
            continue  # small inline constant
        kind = tensor_kind(t.name)
        shape = list(t.dims)
        entry = {"kind": kind, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name, "shape": shape,
                 "file": ext["location"], "offset": int(ext["offset"]), "bytes": int(ext["length"])}
        tensors[t.name] = entry
        by_kind[kind] = by_kind.get(kind, 0) + entry["bytes"]
        if t.name.endswith("_angles"):  # [E, S, P/2]: expert e is one contiguous slice
            angle_tables.append({"tensor": t.name, "experts": shape[0], "expert_bytes": entry["bytes"] // shape[0]})
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(out.iterdir()) if p.is_file()}
    return {"format": FORMAT, "version": VERSION, "model": "model.onnx",
            "op_domains": {op_schemas.DOMAIN: op_schemas.VERSION},
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            **meta, "bytes_by_kind": by_kind, "tensors": tensors, "angle_tables": angle_tables, "files": files}


def read_manifest(model_dir: str | Path, verify: bool = True) -> dict:
    """Load manifest.json; with verify, check every listed file's size and sha256."""
    d = Path(model_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise BmoeError(f"model directory not found: {d}")
    if not path.is_file():
        raise BmoeError(f"{d} is not an exported bmoe model (no {MANIFEST}); export one with bmoe-export")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BmoeError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BmoeError(f"{path} is not a bmoe export manifest")
    if m.get("version") != VERSION:
        raise BmoeError(f"{path} has export version {m.get('version')}; this bmoe reads version {VERSION}")
    domains = m.get("op_domains", {})
    if domains.get(op_schemas.DOMAIN, op_schemas.VERSION) != op_schemas.VERSION:
        raise BmoeError(f"{d} needs {op_schemas.DOMAIN} ops version {domains[op_schemas.DOMAIN]}, "
                        f"this bmoe implements version {op_schemas.VERSION}")
    if verify:
        for name, info in m.get("files", {}).items():
            f = d / name
            if not f.is_file():
                raise BmoeError(f"{d}: file {name} listed in the manifest is missing")
            if f.stat().st_size != info["bytes"]:
                raise BmoeError(f"{d}: {name} has {f.stat().st_size} bytes, the manifest says {info['bytes']} "
                                f"(truncated or replaced?)")
            if sha256(f) != info["sha256"]:
                raise BmoeError(f"{d}: {name} fails its sha256 check (corrupted or modified since export)")
    return m
