"""Router look-ahead prefetch reduces angle-cache misses: on a fixed routing trace (hand-counted LRU)
and on the bundled trained model, with tokens identical to the run without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bmoe_runtime.backends import numba_ops
from bmoe_runtime.runtime import streaming
from bmoe_runtime.runtime.session import ModelSession

from ops_reference import use_ort
from test_streaming import decode

BUNDLED = Path(__file__).resolve().parents[1] / "bmoe_runtime" / "models" / "default"
D, EXPERTS = 100, 6  # 100 wide: 7 stages × 64 pairs a table


@pytest.fixture
def stream(tmp_path):
    angles = np.random.default_rng(0).uniform(-3, 3, (EXPERTS, 7, 64)).astype(np.float16)
    (tmp_path / "a.bin").write_bytes(b"\0" * 64 + angles.tobytes())
    numba_ops.angle_cache_reset()
    return numba_ops.AngleStream(str(tmp_path / "a.bin"), 64, EXPERTS, onnx.TensorProto.FLOAT16, 2), angles


def rotate(stream, angles, experts: list[int]) -> None:
    """One rotate call over rows routed to `experts`, checked against the resident op."""
    x = np.random.default_rng(len(experts)).standard_normal((len(experts), D)).astype(np.float32)
    idx = np.array(experts, np.int64)
    got = numba_ops.butterfly_rotate_streamed(x, stream, idx)
    assert np.array_equal(got, numba_ops.butterfly_rotate(x, angles, idx))


def test_lru_counts_on_a_fixed_trace(stream):
    s, angles = stream
    # 2 slots, LRU. [0,1]: miss 0, miss 1.  [0,2]: hit 0, miss 2 (evicts 1).  [1,3]: miss 1 (evicts 0),
    # miss 3 (evicts 2).  [0,3]: hit 3, miss 0 (evicts 1).  → 2 hits, 6 misses.
    for experts in ([0, 1], [0, 2], [1, 3], [0, 3]):
        rotate(s, angles, experts)
    assert numba_ops.angle_cache_stats() == {"hits": 2, "misses": 6, "bytes_read": 6 * angles[0].nbytes,
                                             "prefetches": 0, "prefetch_hits": 0}


def test_prefetch_of_the_next_call_turns_misses_into_hits(stream):
    s, angles = stream
    trace = [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]  # plain LRU with 2 slots: every look-up misses (10)
    for experts in trace:
        rotate(s, angles, experts)
    plain = numba_ops.angle_cache_stats()
    assert plain["misses"] == 10 and plain["hits"] == 0
    numba_ops.angle_cache_reset()
    s2 = numba_ops.AngleStream(s.path, 64, EXPERTS, onnx.TensorProto.FLOAT16, 2)
    x = np.zeros((1, 4), np.float32)
    rotate(s2, angles, trace[0])  # the stream learns D from its first rotate: 2 misses
    for experts in trace[1:]:  # a correct look-ahead: the next call's experts are prefetched before it
        numba_ops.angle_prefetch(x, np.array(experts, np.int64), s2)
        rotate(s2, angles, experts)
    ahead = numba_ops.angle_cache_stats()
    assert ahead == {"hits": 8, "misses": 2, "bytes_read": 10 * angles[0].nbytes, "prefetches": 8,
                     "prefetch_hits": 8}


BACKENDS = ["numba"] + (["ort"] if use_ort() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lookahead_has_fewer_misses_on_the_bundled_model(backend):
    """The trained router of layer l+1 applied to layer l's input predicts its experts well enough
    that look-ahead cuts the rotates' misses (docs/planner.md: about half at 2-8 slots)."""
    stats, tokens = {}, {}
    for lookahead in (False, True):
        streaming.reset(backend)
        sess = ModelSession(BUNDLED, backend, angle_cache_slots=4, lookahead=lookahead)
        tokens[lookahead], _ = decode(sess, prompt=list(b"ROMEO:\nWhat say you"), steps=24)
        stats[lookahead] = streaming.cache_stats(backend)
    assert tokens[True] == tokens[False]
    plain, ahead = stats[False], stats[True]
    assert plain["hits"] + plain["misses"] == ahead["hits"] + ahead["misses"]  # same look-ups
    assert ahead["prefetch_hits"] > 0
    assert ahead["misses"] < 0.8 * plain["misses"], (plain, ahead)
