"""Planned model directories (bmoe plan --write): an export whose angles stream from angles.bin in the file.

The plan for a device fixes the angle cache (experts a layer); the graph is rewritten once, here, into the
streamed form (streaming.stream_angles: `angle_file` relative to the directory, `angle_file_size`), the
angle initializers are gone from model.onnx, and manifest.json records the plan under "streamed". Any
ONNX Runtime that registers libbmoe_ops with the session config entry `bmoe.model_dir` (ONNX Runtime
GenAI, a C/Java/Swift app, bmoe-run) then streams under the device's budget with no rewrite at load;
the op library resolves the relative name against that directory and confines the read to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format import schema, untrusted
from bmoe_runtime.format.export_dir import staged_export
from bmoe_runtime.format.manifest import MANIFEST, read_manifest, read_verified

PLAN_FIELD = "streamed"
MAX_GRAPH_BYTES = 2**30  # as session.py: model.onnx without its weights
STREAMED_OPS = ("ButterflyRotate", "AnglePrefetch")


def streamed_slots(manifest: dict) -> dict[str, int]:
    """Table → cached experts of a planned directory; {} for an export (angles resident or streamed at load)."""
    return dict(manifest.get(PLAN_FIELD, {}).get("cache_slots", {}))


def planned_cache(manifest: dict) -> int | None:
    """Experts a layer the planned directory caches (None for an export)."""
    slots = streamed_slots(manifest)
    return min(slots.values()) if slots else None


def check_streamed_graph(model: onnx.ModelProto, manifest: dict, where: str) -> None:
    """The streamed nodes read exactly the tables the manifest says are streamed, at their offsets, sizes,
    dtypes and cache sizes; every streamed table has its nodes. One BmoeError naming the first mismatch."""
    slots, tensors, files = streamed_slots(manifest), manifest["tensors"], manifest["files"]
    by_place = {(tensors[t]["file"], tensors[t]["offset"]): t for t in slots}
    used: set[str] = set()
    dtypes = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in STREAMED_OPS or "angle_file" not in attrs:
            continue
        file = attrs["angle_file"].decode(errors="replace") if isinstance(attrs["angle_file"], bytes) else ""
        table = by_place.get((file, attrs.get("angle_offset")))
        t = tensors.get(table) if table else None
        if t is None or attrs.get("angle_experts") != t["shape"][0] or attrs.get("angle_dtype") != dtypes.get(
                t["dtype"]) or attrs.get("angle_file_size") != files[file]["bytes"] or \
                attrs.get("cache_slots") != slots[table]:
            raise BmoeError(f"{where}: streamed node {node.name[:80]!r} does not match the manifest's streamed "
                            "angle tables (file, offset, experts, dtype, size or cache)")
        used.add(table)
    if used != set(slots):
        raise BmoeError(f"{where}: no streamed node reads angle table {sorted(set(slots) - used)[0][:80]!r}")


def write_planned(src: str | Path, out: str | Path, cache_experts: int, plan: dict, force: bool = False,
                  lookahead: bool = False) -> Path:
    """Write OUT: SRC (an export) with every angle table streamed through a cache of `cache_experts`
    experts (clamped to each table's experts). `plan`: device, runtime, budget_bytes, planned_peak_bytes
    (recorded in the manifest). lookahead: also the router look-ahead's AnglePrefetch nodes
    (streaming.add_lookahead). OUT: absent, empty, or (with force) a bmoe export; staged, renamed at the end."""
    src, out = Path(src), Path(out)
    manifest = read_manifest(src, verify="sha256")
    if PLAN_FIELD in manifest:
        raise BmoeError(f"{src} is already a planned directory (its angles stream from the file): plan the export "
                        "it was written from")
    if not manifest["angle_tables"]:
        raise BmoeError(f"{src} has no angle tables: there is nothing to stream")
    if out.resolve() == src.resolve():
        raise BmoeError(f"--write {out} is the model directory itself: write the plan elsewhere")
    from bmoe_runtime.runtime.streaming import stream_angles  # imports numba: not for a GenAI run's checks

    model_file = manifest["model"]
    graph = onnx.load_from_string(read_verified(src, manifest, model_file, MAX_GRAPH_BYTES))
    tables = [t["tensor"] for t in manifest["angle_tables"]]
    stream_angles(graph, src, manifest, cache_experts, lookahead=lookahead)
    left = {t.name for t in graph.graph.initializer}
    slots = {t["tensor"]: min(cache_experts, t["experts"]) for t in manifest["angle_tables"] if t["tensor"] not in left}
    if set(slots) != set(tables):  # an angle table read by something else than a ButterflyRotate
        raise BmoeError(f"{src}: angle table {sorted(set(tables) - set(slots))[0][:80]!r} cannot be streamed")
    with staged_export(out, force) as tmp:
        files = {}
        for name, info in manifest["files"].items():
            if name != model_file:
                files[name] = _copy_verified(src, name, info, tmp / name)
        data = graph.SerializeToString()
        (tmp / model_file).write_bytes(data)
        files[model_file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        planned = {**manifest, "files": dict(sorted(files.items())),
                   PLAN_FIELD: {"cache_slots": slots, "lookahead": lookahead, **plan}}
        schema.check_manifest(planned, str(out / MANIFEST))
        (tmp / MANIFEST).write_text(json.dumps(planned, indent=1), encoding="utf-8")
        check_streamed_graph(graph, read_manifest(tmp, verify="sha256"), str(out))
    return out


def _copy_verified(src: Path, name: str, info: dict, dst: Path) -> dict:
    """Copy src/name to dst, hashing what is copied: the copy is the verified file or nothing."""
    fd = untrusted.open_member(src, name)
    h, n = hashlib.sha256(), 0
    try:
        with open(dst, "xb") as f:
            while block := os.read(fd, 1 << 20):
                h.update(block)
                f.write(block)
                n += len(block)
                if n > info["bytes"]:
                    break
    finally:
        os.close(fd)
    if n != info["bytes"] or h.hexdigest() != info["sha256"]:
        raise BmoeError(f"{src}: {name} changed while it was copied (size or sha256 differs from manifest.json)")
    return dict(info)
