"""A model directory is untrusted input (issue 12): every finding refused with one BmoeError, before any
read outside the directory, unbounded read or blocking open."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.format.tokenizer import load_tokenizer
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.runtime.session import ModelSession
from untrusted_dirs import manifest, replace_file, resign, write_manifest


@pytest.fixture(autouse=True)
def no_hang():
    """A blocking open (a FIFO) or an endless read fails the test instead of hanging the suite."""
    def timeout(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def refused(d: Path, match: str, **kw) -> None:
    """Every entry point refuses: the manifest reader (sha256 and size levels) and the session."""
    for verify in ("sha256", "size"):
        with pytest.raises(BmoeError, match=match):
            read_manifest(d, verify=verify)
    with pytest.raises(BmoeError, match=match):
        ModelSession(d, "numba", **kw)


def edit(d: Path, fn) -> None:
    m = manifest(d)
    fn(m)
    write_manifest(d, m)


def test_pristine_copy_loads_and_generates(d):
    gen = Generator(ModelSession(d, "numba"))
    text, stats = gen.generate("ROMEO:", 3)
    assert stats.new_tokens == 3 and isinstance(text, str)


@pytest.mark.parametrize("key", ["files", "model", "tensors", "format", "version"])
def test_manifest_without_a_required_key(d, key):
    edit(d, lambda m: m.pop(key))
    refused(d, "manifest|required|version|bmoe export")


def test_random_angles_with_files_list_deleted_is_refused(d):
    replace_file(d / "angles.bin", os.urandom((d / "angles.bin").stat().st_size))
    edit(d, lambda m: m.pop("files"))
    refused(d, "'files' is a required property")


@pytest.mark.parametrize("field, value", [("n_heads", 0), ("n_heads", 5), ("d_model", -1), ("max_seq", 100000),
                                          ("vocab_size", 2**40), ("top_k", 17), ("n_layers", "4"),
                                          ("n_experts", 1.5), ("n_heads", True)])
def test_config_numbers_out_of_bounds_or_inconsistent(d, field, value):
    edit(d, lambda m: m["config"].__setitem__(field, value))
    refused(d, "config|tensor|angle table")


def test_max_seq_beyond_the_position_table_is_refused_before_generation(d):
    """Was: IndexError on numba after 250 printed tokens."""
    edit(d, lambda m: m["config"].__setitem__("max_seq", 100000))
    refused(d, r"pos_emb.weight.*max_seq 100000")


def test_deeply_nested_manifest(d):
    edit(d, lambda m: m.__setitem__("metrics", json.loads("[" * 200 + "]" * 200)))
    refused(d, "nested deeper")
    replace_file(d / "manifest.json", b"[" * 100_000 + b"]" * 100_000)
    refused(d, "nested too deeply")


@pytest.mark.parametrize("raw", [b'{"format": NaN}', b"\xff\xfe", b"", b"{" + b'"a":1,' * 10, b"1" * 5000])
def test_manifest_that_is_not_json(d, raw):
    replace_file(d / "manifest.json", raw)
    refused(d, "not valid JSON|not a bmoe export manifest")


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/angles.bin", "..", ".hidden",
                                  "a\x00b", "x" * 300])
def test_file_names_outside_the_directory(d, name):
    def move(m):
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
        for t in m["tensors"].values():
            if t["file"] == "angles.bin":
                t["file"] = name
    edit(d, move)
    refused(d, "does not match|files")


def test_tokenizer_path_to_dev_zero_is_never_read(d):
    edit(d, lambda m: m.__setitem__("tokenizer", "/dev/zero"))
    refused(d, "tokenizer")


def test_symlinked_files_are_refused_even_with_matching_content(d, tmp_path):
    for name in ("angles.bin", "tokenizer.json", "manifest.json"):
        outside = tmp_path / f"outside-{name}"
        outside.write_bytes((d / name).read_bytes())  # same bytes: size and sha256 would match
        os.unlink(d / name)
        os.symlink(outside, d / name)
        refused(d, "symbolic link")
        os.unlink(d / name)
        os.rename(outside, d / name)


def test_symlinked_angles_refused_for_streamed_sessions_too(d, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes((d / "angles.bin").read_bytes())
    os.unlink(d / "angles.bin")
    os.symlink(outside, d / "angles.bin")
    for backend in ("numba", "ort"):
        with pytest.raises(BmoeError, match="symbolic link"):
            ModelSession(d, backend, angle_cache_slots=2)


@pytest.mark.parametrize("name", ["angles.bin", "tokenizer.json", "manifest.json", "model.onnx"])
def test_fifo_is_refused_without_blocking(d, name):
    os.unlink(d / name)
    os.mkfifo(d / name)
    t0 = time.monotonic()
    refused(d, "not a regular file")
    assert time.monotonic() - t0 < 30


def test_directory_in_place_of_a_file(d):
    os.unlink(d / "weights.bin")
    (d / "weights.bin").mkdir()
    refused(d, "not a regular file")


def test_size_is_checked_before_reading(d):
    """A manifest claiming a huge tokenizer is refused on the size, not by reading."""
    edit(d, lambda m: m["files"]["tokenizer.json"].__setitem__("bytes", 2**39))
    refused(d, r"tokenizer.json has \d+ bytes, the manifest says 549755813888")


@pytest.mark.parametrize("name", ["weights.bin", "angles.bin", "model.onnx", "tokenizer.json"])
def test_truncated_extended_and_flipped_files(d, name):
    data = (d / name).read_bytes()
    replace_file(d / name, data[:-1])
    refused(d, "truncated or replaced")
    replace_file(d / name, data + b"\0")
    refused(d, "truncated or replaced")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    replace_file(d / name, bytes(flipped))
    with pytest.raises(BmoeError, match="sha256"):
        read_manifest(d)
    with pytest.raises(BmoeError, match="sha256"):
        ModelSession(d, "numba")


def test_bytes_by_kind_must_add_up(d):
    """The planner sizes memory from bytes_by_kind: a lie there would break the budget."""
    edit(d, lambda m: m["bytes_by_kind"].__setitem__("attention", 1))
    refused(d, "bytes_by_kind")


def test_tensor_past_the_end_of_its_file(d):
    def grow(m):
        t = m["tensors"][next(name for name in m["tensors"] if "tok_emb" in name)]
        t["offset"] = m["files"][t["file"]]["bytes"]
    edit(d, grow)
    refused(d, "ends past the end")


def _relocate_in_graph(d: Path, location: str) -> None:
    proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for e in proto.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = location
    replace_file(d / "model.onnx", proto.SerializeToString())


@pytest.mark.parametrize("location", ["../../../../etc/passwd", "/etc/passwd", "angles.bin"])
def test_graph_external_data_outside_the_manifest_is_refused(d, location):
    """model.onnx re-signed by an attacker: its external data still may only be what the manifest lists."""
    _relocate_in_graph(d, location)
    resign(d)
    read_manifest(d)  # the manifest itself is consistent
    for backend in ("numba", "ort"):
        with pytest.raises(BmoeError, match="does not match the manifest"):
            ModelSession(d, backend)


@pytest.mark.parametrize("content, match", [
    (b'{"kind": "bpe", "json": "not a tokenizer"}', "not a readable"),
    (b'{"kind": "bpe"}', "unknown tokenizer"),
    (b'{"kind": "wordpiece"}', "unknown tokenizer"),
    (b"[1, 2]", "unknown tokenizer"),
    (b"{" * 100 + b"}" * 100, "not valid JSON|nested"),
    (b'{"kind": "bpe", "json": "' + b"[" * 10000 + b'"}', "not a readable"),
])
def test_bad_tokenizer_file(d, content, match):
    replace_file(d / "tokenizer.json", content)
    resign(d)
    with pytest.raises(BmoeError, match=match):
        load_tokenizer(d, read_manifest(d))
    with pytest.raises(BmoeError, match=match):
        Generator(ModelSession(d, "ort"))


def test_tokenizer_vocabulary_must_match_the_model(d):
    from tokenizers import Tokenizer, models

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    replace_file(d / "tokenizer.json", json.dumps({"kind": "bpe", "json": bpe.to_str()}).encode())
    resign(d)
    with pytest.raises(BmoeError, match="tokenizer has 2 tokens, the model 256"):
        Generator(ModelSession(d, "numba"))


def test_tokenizer_is_read_once_with_its_hash_checked(d):
    """The plan reads the tokenizer before the session: it too gets only verified bytes."""
    m = read_manifest(d, verify="size")
    data = (d / "tokenizer.json").read_bytes()
    replace_file(d / "tokenizer.json", data[:-1] + b" ")  # same size, other bytes
    with pytest.raises(BmoeError, match="sha256"):
        load_tokenizer(d, m)


def test_wrong_op_version_keeps_its_message(d):
    edit(d, lambda m: m["op_domains"].__setitem__("ai.bmoe", 99))
    refused(d, "needs ai.bmoe ops version 99")


def test_session_threads_are_validated_and_capped(d):
    with pytest.raises(BmoeError, match="threads"):
        ModelSession(d, "ort", threads=0)
    t0 = time.monotonic()
    sess = ModelSession(d, "ort", threads=100_000)  # was: minutes of thread creation
    gen = Generator(sess)
    gen.step(np.array([[1, 2]], np.int64), gen.empty_cache())
    assert time.monotonic() - t0 < 30


def test_manifest_sha256_of_pristine_files_matches_hashlib(d):
    """The checks compare against an independent digest, not against themselves."""
    m = read_manifest(d)
    for name, info in m["files"].items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == info["sha256"]
