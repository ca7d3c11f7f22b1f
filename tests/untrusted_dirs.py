"""Helpers for the untrusted-input tests: copies of the bundled model that a test may damage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from bmoe_runtime import default_model_dir

MANIFEST = "manifest.json"


def pristine_copy(dest: Path) -> Path:
    """A private copy of the bundled model."""
    return Path(shutil.copytree(default_model_dir(), dest))


def fresh_copy(src: Path, dest: Path) -> Path:
    """A copy to damage (real copies: onnx refuses hardlinked external data)."""
    return Path(shutil.copytree(src, dest))


def replace_file(path: Path, data: bytes) -> None:
    """New contents under the same name without touching the (possibly shared) old inode."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def write_manifest(d: Path, m: dict) -> None:
    replace_file(d / MANIFEST, json.dumps(m).encode())


def resign(d: Path) -> None:
    """What an attacker (or a careless tool) does: make the manifest's sizes and hashes match the files."""
    m = manifest(d)
    for name in m["files"]:
        p = d / name
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_manifest(d, m)
