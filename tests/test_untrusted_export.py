"""Writes never lose a user's data (issue 12): bmoe-export -o DIR refuses what is not a bmoe export, replaces
one only with force, keeps the user's permissions; interrupted exports and checkpoint saves leave nothing
that survives the next run; checkpoints carry a checksum."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bmoe_runtime.errors import BmoeError, CheckpointError
from bmoe_runtime.format import staging
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.format.tokenizer import ByteTokenizer
from bmoe_runtime.nn.model import ModelConfig, MoELM
from bmoe_runtime.train.checkpoint import content_sha256, read_checkpoint, save_checkpoint
from exporters.onnx_export import _write_dir, export_checkpoint

REPO = Path(__file__).resolve().parents[1]
_UMASK = os.umask(0)
os.umask(_UMASK)
UMASK_MODE = 0o777 & ~_UMASK


def tiny_graph() -> onnx.ModelProto:
    """A real ONNX model with one external-sized initializer (16 KiB), enough to exercise the directory writer."""
    w = helper.make_tensor("lm.blocks.0.attn.w", TensorProto.FLOAT, [64, 64], np.eye(64, dtype=np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "lm.blocks.0.attn.w"], ["y"])], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def write(out: Path, force: bool = False, marker: str = "a") -> Path:
    return _write_dir(out, tiny_graph(), {"kind": "module", "marker": marker}, {}, force)


def tiny_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = MoELM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, n_experts=2, top_k=1, max_seq=32))
    save_checkpoint(path, model, ByteTokenizer(), {"valid": {"loss": 1.0}})


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_into_a_users_directory_is_refused_and_nothing_is_touched(tmp_path):
    """Was: bmoe-export deleted notes.txt and sub/data.csv."""
    tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub" / "data.csv").write_text("1,2\n")
    before = listing(out)
    for force in (False, True):
        with pytest.raises(BmoeError, match="not empty and not a bmoe export"):
            export_checkpoint(tmp_path / "m.pt", out, force=force)
        with pytest.raises(BmoeError, match="not empty and not a bmoe export"):
            write(out, force=force)
    assert listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "mine"]  # no leftovers


def test_export_with_a_users_file_added_is_refused_even_with_force(tmp_path):
    out = write(tmp_path / "x")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BmoeError, match=r"not a bmoe export \(it holds notes.txt\)"):
        write(out, force=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_previous_export_is_replaced_only_with_force(tmp_path):
    out = write(tmp_path / "x", marker="old")
    with pytest.raises(BmoeError, match="--force"):
        write(out, marker="new")
    assert read_manifest(out)["marker"] == "old"
    write(out, force=True, marker="new")
    assert read_manifest(out)["marker"] == "new"  # verified: every file's size and sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_empty_directory_file_and_symlink_targets(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty")
    read_manifest(tmp_path / "empty")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(BmoeError, match="not a directory"):
        write(tmp_path / "file")
    os.symlink(tmp_path / "empty", tmp_path / "link")
    with pytest.raises(BmoeError, match="symbolic link"):
        write(tmp_path / "link", force=True)
    assert (tmp_path / "file").read_text() == "keep"


def test_export_keeps_the_users_permissions(tmp_path):
    """Was: mode 0700 (mkdtemp's)."""
    out = write(tmp_path / "x")
    assert out.stat().st_mode & 0o777 == UMASK_MODE
    assert all(p.stat().st_mode & 0o777 == UMASK_MODE & 0o666 for p in out.iterdir())


def test_failed_export_removes_its_stage_and_keeps_the_old_export(tmp_path, monkeypatch):
    out = write(tmp_path / "x", marker="old")
    import exporters.onnx_export as ox

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ox, "build_manifest", disk_full)
    with pytest.raises(OSError):
        write(out, force=True, marker="new")
    assert read_manifest(out)["marker"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def _hold_stage(kind: str, target: Path) -> subprocess.Popen:
    """A writer in another process, inside staged_dir/staged_file, that we can SIGKILL."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from bmoe_runtime.format import staging
        with staging.staged_{kind}(Path({str(target)!r})) as p:
            print(p, flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip()
    return proc


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_leftovers_of_a_killed_writer_are_cleaned_by_the_next_one_but_not_a_live_ones(tmp_path, kind):
    target = tmp_path / ("x" if kind == "dir" else "m.pt")
    live = _hold_stage(kind, target)
    killed = _hold_stage(kind, target)
    try:
        killed.kill()
        killed.wait()
        stages = sorted(tmp_path.glob(".*.partial-*"))
        assert len(stages) == 2
        removed = staging.clean_stale(target)
        assert len(removed) == 1 and len(sorted(tmp_path.glob(".*.partial-*"))) == 1  # the live one stays
    finally:
        live.kill()
        live.wait()
    assert len(staging.clean_stale(target)) == 1


def test_the_next_export_and_save_clean_legacy_leftovers(tmp_path):
    """Leftovers of bmoe versions before staging.py (no lock): .x.partial-*, .x.old-PID, m.pt.*.tmp."""
    (tmp_path / ".x.partial-abc123").mkdir()
    (tmp_path / ".x.partial-abc123" / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp_path / ".x.old-4242").mkdir()
    (tmp_path / "m.pt.k2j3.tmp").write_bytes(b"\0" * 1000)
    write(tmp_path / "x")
    tiny_checkpoint(tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "x"]


def test_checkpoint_is_saved_with_normal_permissions_and_a_verified_checksum(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == UMASK_MODE & 0o666  # was 0600 (mkstemp)
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["checksum"]["sha256"] == content_sha256(ckpt)


def test_checksum_sees_every_tensor_element_and_value(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    base = content_sha256(ckpt)
    for name in ("tok_emb.weight", "blocks.0.moe.experts.theta.angles"):
        t = ckpt["state_dict"][name]
        t.view(-1)[-1] = torch.nextafter(t.view(-1)[-1], torch.tensor(np.inf))  # one ulp of one element
        assert content_sha256(ckpt) != base
        ckpt = read_checkpoint(tmp_path / "m.pt")
    ckpt["config"]["max_seq"] += 1
    assert content_sha256(ckpt) != base
    ckpt = read_checkpoint(tmp_path / "m.pt")
    ckpt["metrics"]["valid"]["loss"] = 1.0000000000000002
    assert content_sha256(ckpt) != base
    reordered = dict(reversed(list(read_checkpoint(tmp_path / "m.pt").items())))
    assert content_sha256(reordered) == base  # key order is not content


def test_modified_checkpoint_fails_and_an_old_one_loads_with_a_warning(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    ckpt = read_checkpoint(tmp_path / "m.pt")
    ckpt["state_dict"]["tok_emb.weight"][0, 0] += 1
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="fails its checksum"):
        read_checkpoint(tmp_path / "edited.pt")
    del ckpt["checksum"]
    torch.save(ckpt, tmp_path / "old.pt")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("bmoe").addHandler(handler)
    try:
        assert read_checkpoint(tmp_path / "old.pt")["state_dict"]["tok_emb.weight"][0, 0] == \
            ckpt["state_dict"]["tok_emb.weight"][0, 0]
    finally:
        logging.getLogger("bmoe").removeHandler(handler)
    assert [r.getMessage() for r in records if "has no checksum" in r.getMessage()]


def test_checksum_is_iterative_on_deep_values(tmp_path):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    t0 = time.monotonic()
    assert len(content_sha256({"metrics": deep})) == 64  # no RecursionError
    assert time.monotonic() - t0 < 30
