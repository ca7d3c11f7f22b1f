"""Fuzz harness (hypothesis): corrupted copies of the bundled model directory. Every case must end in a
one-line BmoeError, or run one decoding step whose logits are bit-identical to the original's (after
re-signing, where the manifest again certifies the files, the run only has to end cleanly). Any other
exception, a case over CASE_TIMEOUT_S (a hang), or a run of files that differ from what the manifest
certifies (silent-wrong) fails the test.

    BMOE_FUZZ_EXAMPLES=5000 BMOE_FUZZ_REPORT=fuzz.json .venv/bin/python -m pytest tests/test_untrusted_fuzz.py

CI runs BMOE_FUZZ_EXAMPLES's default (derandomized: the same cases every run); BMOE_FUZZ_SEED=<int>
explores other ones. The report (per category: cases, clean errors, accepted, seconds) feeds
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.runtime.session import ModelSession
from untrusted_dirs import manifest, pristine_copy, replace_file, resign, write_manifest

EXAMPLES = int(os.environ.get("BMOE_FUZZ_EXAMPLES", "200"))
SEED = os.environ.get("BMOE_FUZZ_SEED")
FEED = np.array([[1, 2, 3]], np.int64)
CASE_TIMEOUT_S = 60

class Skip(Exception):
    """A mutation that cannot apply to what an earlier one left (no manifest to edit, a FIFO to read)."""


def _readable(p: Path) -> Path:
    if p.is_symlink() or not p.is_file():
        raise Skip(p.name)
    return p


def _manifest(d: Path) -> dict:
    try:
        _readable(d / "manifest.json")
        return manifest(d)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Skip("manifest.json") from None


def _resign(d: Path) -> None:
    m = _manifest(d)
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise Skip("files")
    for name in files:
        if "/" in name or name in ("", ".", "..") or ((d / name).exists() and not (d / name).is_file()):
            raise Skip(name)  # resigning would read outside the copy, or block on a FIFO
    resign(d)


class Mutation:
    """A named change to a directory (hypothesis prints the name of a failing case)."""

    def __init__(self, name: str, apply):
        self.name, self.apply = name, apply

    def __call__(self, d: Path):
        return self.apply(d)

    def __repr__(self) -> str:
        return self.name[:300]


# ---- mutations: each applies itself to a copy and returns its category

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../../../../etc/passwd", "/dev/zero", "/etc/passwd", "model.onnx", "angles.bin", "", "..",
                     "manifest.json", "a/b", "0" * 64, "lm"]),
    st.lists(st.integers(-2, 300), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.integers(1, 150).map(lambda n: json.loads("[" * n + "]" * n)),
)


def _paths(v, prefix=()) -> list[tuple]:
    """Every key path of the manifest (tensors sampled: they are many and alike)."""
    out = [prefix] if prefix else []
    if isinstance(v, dict):
        items = list(v.items())
        if prefix == ("tensors",):
            items = items[:3] + items[-2:]
        for k, x in items:
            out += _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v[:2]):
            out += _paths(x, prefix + (i,))
    return out


@st.composite
def json_field(draw, paths):
    path = draw(st.sampled_from(paths))
    delete = draw(st.booleans())
    value = None if delete else draw(_values)

    def apply(d: Path):
        m = _manifest(d)
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            if delete:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            raise Skip(str(path)) from None
        write_manifest(d, m)
        return "manifest field"
    return Mutation(f"field {path} " + ("deleted" if delete else f"= {value!r}"), apply)


@st.composite
def raw_manifest(draw):
    how = draw(st.sampled_from(["truncate", "insert", "deep", "bad utf-8", "huge number"]))
    at = draw(st.integers(0, 20000))
    junk = draw(st.binary(min_size=1, max_size=8))
    depth = draw(st.integers(100, 200_000))

    def apply(d: Path):
        raw = _readable(d / "manifest.json").read_bytes()
        k = at % max(len(raw), 1)
        new = {"truncate": raw[:k], "insert": raw[:k] + junk + raw[k:], "deep": b"[" * depth + b"]" * depth,
               "bad utf-8": raw[:k] + b"\xff\xfe" + raw[k:], "huge number": raw.replace(b'"opset": 20', b'"opset": ' +
                                                                                         b"9" * 5000, 1)}[how]
        replace_file(d / "manifest.json", new)
        return "manifest bytes"
    return Mutation(f"manifest bytes {how} at {at}", apply)


@st.composite
def file_content(draw, names):
    name = draw(st.sampled_from(names))
    how = draw(st.sampled_from(["truncate", "extend", "flip", "random"]))
    at = draw(st.integers(0, 2**31))
    bit = draw(st.integers(0, 7))
    tail = draw(st.binary(min_size=1, max_size=64))
    resigned = draw(st.booleans())

    def apply(d: Path):
        data = bytearray(_readable(d / name).read_bytes())
        k = at % max(len(data), 1)
        if how == "truncate":
            data = data[:k]
        elif how == "extend":
            data += tail
        elif how == "flip" and data:
            data[k] ^= 1 << bit
        else:
            data = bytearray(np.random.default_rng(at).integers(0, 256, len(data), np.uint8).tobytes())
        replace_file(d / name, bytes(data))
        if resigned:  # an attacker's (or a careless tool's) consistent manifest: deeper checks must hold
            _resign(d)
            return "file bytes, re-signed"
        return "file bytes"
    return Mutation(f"{name} {how} at {at} bit {bit}" + (" re-signed" if resigned else ""), apply)


@st.composite
def file_kind(draw, names):
    name = draw(st.sampled_from([*names, "manifest.json"]))
    how = draw(st.sampled_from(["symlink to a copy", "symlink to /dev/zero", "symlink to /etc/passwd", "fifo",
                                "directory", "deleted", "dangling symlink"]))

    def apply(d: Path):
        p = _readable(d / name)
        copy = d.parent / f"outside-{name}"
        shutil.copyfile(p, copy)
        p.unlink()
        if how == "fifo":
            os.mkfifo(p)
        elif how == "directory":
            p.mkdir()
        elif how != "deleted":
            target = {"symlink to a copy": copy, "symlink to /dev/zero": "/dev/zero",
                      "symlink to /etc/passwd": "/etc/passwd", "dangling symlink": d / "nowhere"}[how]
            os.symlink(target, p)
        return "file kind"
    return Mutation(f"{name} {how}", apply)


@st.composite
def graph_external(draw):
    index = draw(st.integers(0, 1000))
    key = draw(st.sampled_from(["location", "offset", "length"]))
    value = draw(st.one_of(st.sampled_from(["../../../../etc/passwd", "/etc/passwd", "angles.bin", "weights.bin",
                                            "manifest.json", "tokenizer.json", "nope.bin"]),
                           st.integers(-5, 2**40).map(str)))

    def apply(d: Path):
        try:
            proto = onnx.load(str(_readable(d / "model.onnx")), load_external_data=False)
        except Skip:
            raise
        except Exception:  # a model.onnx an earlier mutation broke
            raise Skip("model.onnx") from None
        ext = [t for t in proto.graph.initializer if t.external_data]
        if not ext:
            raise Skip("model.onnx")
        for e in ext[index % len(ext)].external_data:
            if e.key == key:
                e.value = value
        replace_file(d / "model.onnx", proto.SerializeToString())
        _resign(d)
        return "graph external data, re-signed"
    return Mutation(f"graph external {key} of #{index} = {value!r}, re-signed", apply)


# ---- the harness

def _run(d: Path) -> np.ndarray | None:
    """What bmoe-run does with a directory: verify, load (ONNX Runtime), one decoding step."""
    read_manifest(d)
    gen = Generator(ModelSession(d, "ort", threads=1))
    logits, _ = gen.step(FEED, gen.empty_cache())
    return logits


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = pristine_copy(tmp_path_factory.mktemp("fuzz") / "pristine")
    return d, _run(d)


@pytest.fixture(scope="module")
def report():
    stats: dict[str, Counter] = {}
    t0 = time.monotonic()
    yield stats
    out = os.environ.get("BMOE_FUZZ_REPORT")
    if out:
        rows = {k: dict(v) for k, v in sorted(stats.items())}
        Path(out).write_text(json.dumps({"examples": EXAMPLES, "seed": SEED, "seconds": time.monotonic() - t0,
                                         "categories": rows}, indent=1))


def _differs(original: Path, p: Path) -> bool:
    """Not the certified file any more: gone, not a regular file, or other bytes."""
    return p.is_symlink() or not p.is_file() or p.read_bytes() != original.read_bytes()


def _timeout(*_):
    raise TimeoutError(f"a case ran past {CASE_TIMEOUT_S} s")


def test_corrupted_model_directories_end_in_clean_errors(pristine, report, tmp_path_factory):
    src, reference = pristine
    m = manifest(src)
    names = sorted(m["files"])
    mutation = st.one_of(json_field(_paths(m)), raw_manifest(), file_content(names), file_kind(names),
                         graph_external())
    work = tmp_path_factory.mktemp("cases")
    counter = iter(range(10**9))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
              suppress_health_check=list(HealthCheck))
    @given(mutations=st.lists(mutation, min_size=1, max_size=2))
    def case(mutations):
        d = Path(shutil.copytree(src, work / f"c{next(counter)}" / "m"))
        try:
            results = []
            for apply in mutations:
                try:
                    results.append(apply(d))
                except Skip:
                    pass
            assume(results)
            category = results[0] if len(results) == 1 else "two mutations"
            resigned = any("re-signed" in name for name in results)  # a consistent manifest again
            must_refuse = not resigned and any(_differs(src / f, d / f) for f in names)
            stat = report.setdefault(category, Counter())
            stat["cases"] += 1
            old = signal.signal(signal.SIGALRM, _timeout)
            signal.alarm(CASE_TIMEOUT_S)
            t0 = time.monotonic()
            try:
                logits = _run(d)
            except BmoeError as exc:
                assert str(exc) and "\n" not in str(exc), f"not one line: {exc!r}"
                stat["clean errors"] += 1
                return
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
                stat["seconds"] += time.monotonic() - t0
            stat["accepted"] += 1
            if must_refuse or (not resigned and not np.array_equal(logits, reference)):
                stat["silent-wrong"] += 1
                pytest.fail(f"{category}: a changed directory ran without an error")
        finally:
            shutil.rmtree(d.parent, ignore_errors=True)

    if SEED is not None:
        case = seed(int(SEED))(case)
    case()
