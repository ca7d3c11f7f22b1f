"""Streamed expert angles (bmoe_runtime/streaming.py): a bounded cache filled from angles.bin
on demand gives exactly the resident model's logits and tokens, in both backends."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from bmoe_runtime import numba_ops, ort_ops, streaming
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.generate import Generator
from bmoe_runtime.session import ModelSession
from exporters import ExportOptions, export_checkpoint

from test_export import make_checkpoint

BACKENDS = ["numba"] + (["ort"] if ort_ops.available() else [])
PROMPT = list(b"To be, or not")
STEPS = 24
MODELS = {"fp16": 8, "int8": 4}  # angle dtype → experts


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stream")
    out = {}
    for dtype, experts in MODELS.items():
        make_checkpoint(d / f"{dtype}.pt", n_experts=experts)
        out[dtype] = export_checkpoint(d / f"{dtype}.pt", d / dtype, ExportOptions(angle_dtype=dtype))
    return out


def decode(sess: ModelSession, prompt=PROMPT, steps=STEPS) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and every step's logits."""
    gen = Generator(sess)
    logits, past = gen.step(np.array([prompt], np.int64), gen.empty_cache())
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[0, -1])))
        logits, past = gen.step(np.array([[tokens[-1]]], np.int64), past)
        all_logits.append(logits)
    return tokens, all_logits


_resident: dict = {}


def resident(models, dtype, backend):
    if (dtype, backend) not in _resident:
        _resident[dtype, backend] = decode(ModelSession(models[dtype], backend))
    return _resident[dtype, backend]


def angle_tables(model_dir: Path) -> list[dict]:
    return json.loads((model_dir / "manifest.json").read_text())["angle_tables"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(MODELS))
@pytest.mark.parametrize("slots", [1, 2])
def test_streamed_matches_resident_exactly(models, backend, dtype, slots):
    ref_tokens, ref_logits = resident(models, dtype, backend)
    streaming.reset(backend)
    sess = ModelSession(models[dtype], backend, angle_cache_slots=slots)
    tokens, logits = decode(sess)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        assert np.array_equal(a, b)
    stats = streaming.cache_stats(backend)
    sizes = {t["expert_bytes"] for t in angle_tables(models[dtype])}
    assert stats["misses"] > 0
    assert min(sizes) * stats["misses"] <= stats["bytes_read"] <= max(sizes) * stats["misses"]
    # every layer's two tables are looked up for each expert a step uses (top-2 of E)
    assert stats["hits"] + stats["misses"] >= 4 * 2 * (STEPS + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_read_is_misses_times_slice(models, backend):
    """Only one table streamed (dict form): every byte read is one of its expert slices."""
    table = angle_tables(models["fp16"])[0]
    streaming.reset(backend)
    sess = ModelSession(models["fp16"], backend, angle_cache_slots={table["tensor"]: 1})
    tokens, _ = decode(sess, steps=8)
    assert tokens == resident(models, "fp16", backend)[0][:8]
    stats = streaming.cache_stats(backend)
    assert stats["misses"] > 0 and stats["bytes_read"] == stats["misses"] * table["expert_bytes"]
    # slots ≥ E: each expert is read at most once, then only hits
    streaming.reset(backend)
    sess = ModelSession(models["fp16"], backend, angle_cache_slots={table["tensor"]: 100})
    decode(sess, steps=8)
    stats = streaming.cache_stats(backend)
    assert 0 < stats["misses"] <= table["experts"] and stats["hits"] > 0


def test_stream_angles_removes_the_initializers(models):
    d = models["int8"]
    manifest = json.loads((d / "manifest.json").read_text())
    proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
    streaming.stream_angles(proto, d, manifest, 2)
    names = {t.name for t in proto.graph.initializer}
    assert not [n for n in names if n.endswith("_angles")]
    assert [n for n in names if n.endswith("_angle_scale")]  # int8 scales stay resident
    nodes = [n for n in proto.graph.node if n.op_type == "ButterflyRotate"]
    assert nodes and all(n.input[1] == "" for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert Path(attrs["angle_file"].decode()) == (d / "angles.bin").resolve()
    assert attrs["angle_dtype"] == onnx.TensorProto.INT8 and attrs["cache_slots"] == 2
    assert attrs["angle_experts"] == MODELS["int8"]
    with pytest.raises(BmoeError, match="unknown angle tables"):
        streaming.stream_angles(proto, d, manifest, {"nope_angles": 1})
    with pytest.raises(BmoeError, match="must be an integer ≥ 1"):
        ModelSession(d, "numba", angle_cache_slots=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_angle_file_is_a_clear_error(models, backend, tmp_path):
    d = Path(shutil.copytree(models["fp16"], tmp_path / "copy"))
    data = (d / "angles.bin").read_bytes()
    (d / "angles.bin").write_bytes(data[: len(data) // 2])  # the second layer's tables are gone
    sess = ModelSession(d, backend, verify=False, angle_cache_slots=1)  # past the manifest's size check
    gen = Generator(sess)
    with pytest.raises(BmoeError, match=r"angle_file '.*angles\.bin' is truncated: expert \d+ needs bytes"):
        gen.step(np.array([PROMPT], np.int64), gen.empty_cache())


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_angle_file_is_a_clear_error(models, backend, tmp_path):
    d = Path(shutil.copytree(models["fp16"], tmp_path / "copy"))
    (d / "angles.bin").unlink()
    with pytest.raises(BmoeError, match="cannot open angle_file '.*angles.bin'"):
        ModelSession(d, backend, verify=False, angle_cache_slots=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_one_session(models, backend):
    prompts = [PROMPT, list(b"Something else entirely")]
    sess = ModelSession(models["fp16"], backend, threads=2, angle_cache_slots=1)
    alone = [decode(sess, p, 16)[0] for p in prompts]
    results: dict[int, list[int]] = {}
    errors = []

    def worker(i):
        try:
            for _ in range(2):
                results.setdefault(i, []).append(decode(sess, prompts[i], 16)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {0: [alone[0]] * 2, 1: [alone[1]] * 2}
    assert alone[0] == resident(models, "fp16", backend)[0][:16]


def test_numba_stream_groups_when_a_call_needs_more_experts_than_slots(tmp_path):
    """Prefill-like call: 40 rows over all 6 experts, 1 slot."""
    rng = np.random.default_rng(0)
    angles = rng.uniform(-3, 3, (6, 7, 64)).astype(np.float16)
    (tmp_path / "a.bin").write_bytes(b"\0" * 128 + angles.tobytes())
    stream = numba_ops.AngleStream(str(tmp_path / "a.bin"), 128, 6, onnx.TensorProto.FLOAT16, 1)
    x = rng.standard_normal((40, 100)).astype(np.float32)
    idx = rng.integers(0, 6, 40).astype(np.int64)
    for transpose in (0, 1):
        got = numba_ops.butterfly_rotate_streamed(x, stream, idx, None, transpose)
        assert np.array_equal(got, numba_ops.butterfly_rotate(x, angles, idx, None, transpose))


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_counters_are_deterministic_and_agree_across_backends(models):
    """Hits first, misses inserted in expert order: the LRU does not depend on thread timing."""
    seen = []
    for backend in ["ort", "ort", "numba"]:
        streaming.reset(backend)
        decode(ModelSession(models["fp16"], backend, threads=4, angle_cache_slots=2), steps=12)
        seen.append(streaming.cache_stats(backend))
    assert seen[0] == seen[1] == seen[2] and seen[0]["hits"] > 0
