"""manifest.json of an exported model: what is in the directory, how big, and its checksums.

Written by the exporter, verified by every runtime before anything is loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

from bmoe_runtime.format import op_schemas, schema, untrusted
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


MAX_MANIFEST_BYTES = 16 * 2**20
VERIFY_LEVELS = ("sha256", "size", "none")


def read_manifest(model_dir: str | Path, verify: bool | str = True) -> dict:
    """Load and validate manifest.json (schema.py), then check the files it lists.

    verify: "sha256" (True) — every listed file is a regular file inside the directory with its
    size and sha256; "size" — the same without hashing (cheap: one fstat a file; for a caller that
    verifies the hashes when it loads); "none" (False) — the manifest alone (tests of lower layers).
    """
    level = {True: "sha256", False: "none"}.get(verify, verify)
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    d = Path(model_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise BmoeError(f"model directory not found: {d}")
    if not os.path.lexists(path):
        raise BmoeError(f"{d} is not an exported bmoe model (no {MANIFEST}); export one with bmoe-export")
    m = untrusted.parse_json(untrusted.read_bounded(path, MAX_MANIFEST_BYTES, "manifest"), str(path))
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BmoeError(f"{path} is not a bmoe export manifest")
    if m.get("version") != VERSION:
        raise BmoeError(f"{path} has export version {str(m.get('version'))[:20]}; this bmoe reads version {VERSION}")
    domains = m.get("op_domains", {})
    if isinstance(domains, dict) and domains.get(op_schemas.DOMAIN, op_schemas.VERSION) != op_schemas.VERSION:
        raise BmoeError(f"{d} needs {op_schemas.DOMAIN} ops version {str(domains[op_schemas.DOMAIN])[:20]}, "
                        f"this bmoe implements version {op_schemas.VERSION}")
    schema.check_manifest(m, str(path))
    if level != "none":
        for name, info in m["files"].items():
            untrusted.check_member(d, name, info["bytes"], info["sha256"] if level == "sha256" else None)
    return m


def read_verified(model_dir: str | Path, manifest: dict, name: str, limit: int) -> bytes:
    """A listed file's bytes, read once, size- and sha256-checked (refused above `limit` bytes)."""
    info = manifest["files"][name]
    if info["bytes"] > limit:
        raise BmoeError(f"{model_dir}: {name} is {info['bytes']} bytes, more than the {limit} allowed")
    return untrusted.read_member(Path(model_dir), name, info["bytes"], info["sha256"])
