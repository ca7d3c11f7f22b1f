"""examples/c: a C program (ORT's C API + libbmoe_ops, no Python) generates the same greedy tokens as the Python
runtime on the bundled model, and its peak RSS is what `bmoe plan --runtime native` predicts (within 10%)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bmoe_runtime import default_model_dir
from bmoe_runtime.backends import native, ort_ops
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.planning.devices import resolve_device
from bmoe_runtime.planning.planner import MIB, SAFETY_MARGIN, Settings, make_plan
from bmoe_runtime.runtime.session import ModelSession

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "c" / "bmoe_generate.c"
PROMPT, N_NEW = "ROMEO:", 24


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    include, ort_lib = native.ort_include_dir(), native.ort_library()
    assert include and ort_lib and ort_ops.library_path(), \
        f"native build needs the ORT header ({include}), libonnxruntime ({ort_lib}) and libbmoe_ops"
    out = tmp_path_factory.mktemp("native")
    (out / "libonnxruntime.so.1").symlink_to(ort_lib)  # the soname; the wheel ships only the versioned file
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", out / "bmoe_generate", EXAMPLE,
                    f"-I{include}", ort_lib, f"-Wl,-rpath,{out}"], check=True)
    return out / "bmoe_generate"


def run_example(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def python_greedy(model_dir: Path, prompt_ids: list[int], n: int) -> list[int]:
    """Independent loop: the Numba reference runtime, full-sequence recompute each step (no KV cache)."""
    sess = ModelSession(model_dir, backend="numba")
    cfg = sess.manifest["config"]
    empty = np.zeros((1, cfg["n_heads"], 0, cfg["d_model"] // cfg["n_heads"]), np.float32)  # no past positions
    ids = list(prompt_ids)
    for _ in range(n):
        feeds = {name: empty for name in sess.inputs if name != "input_ids"}
        feeds["input_ids"] = np.array([ids], np.int64)
        ids.append(int(sess.run(feeds)["logits"][0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_example_generates_the_python_runtimes_tokens(example):
    r = run_example(example, str(default_model_dir()), str(ort_ops.library_path()), PROMPT, str(N_NEW))
    assert r.returncode == 0, r.stderr
    tokens = [int(t) for t in re.search(r"tokens: ([\d ]+)", r.stdout).group(1).split()]
    assert tokens == python_greedy(default_model_dir(), list(PROMPT.encode()), N_NEW)


def test_example_feeds_the_padding_inputs_of_new_exports(example, byte_export):
    manifest = read_manifest(byte_export, verify=False)
    assert {"attention_mask", "position_ids"} <= set(manifest["inputs"])
    r = run_example(example, str(byte_export), str(ort_ops.library_path()), PROMPT, str(N_NEW))
    assert r.returncode == 0, r.stderr
    tokens = [int(t) for t in re.search(r"tokens: ([\d ]+)", r.stdout).group(1).split()]
    assert tokens == python_greedy(byte_export, list(PROMPT.encode()), N_NEW)


def test_example_peak_rss_matches_the_native_plan(example):
    r = run_example(example, str(default_model_dir()), str(ort_ops.library_path()), PROMPT, str(N_NEW))
    assert r.returncode == 0, r.stderr
    measured = float(re.search(r"peak RSS ([\d.]+) MiB", r.stderr).group(1)) * MIB
    plan = make_plan(read_manifest(default_model_dir(), verify=False), resolve_device("android-sd8gen2"),
                     Settings("ort", context=len(PROMPT) + N_NEW, prefill=len(PROMPT), runtime="native"))
    assert plan.settings["runtime"] == "native"
    # The plan's peak keeps a safety margin free on purpose; what it predicts the run to use is the rest.
    predicted_use = plan.peak_bytes - SAFETY_MARGIN
    assert abs(measured / predicted_use - 1) <= 0.10, (measured / MIB, predicted_use / MIB)
    assert measured <= plan.peak_bytes  # and the budget it would be given holds


@pytest.mark.parametrize("args, message", [
    (("/nonexistent", "LIB", "x", "4"), "onnxruntime"),
    (("MODEL", "LIB", "x", "0"), "N_NEW must be"),
    (("MODEL", "LIB", "", "4"), "PROMPT must not be empty"),
    (("MODEL", "/nonexistent.so", "x", "4"), "onnxruntime"),
])
def test_example_bad_input_is_one_clear_line(example, args, message):
    subst = {"MODEL": str(default_model_dir()), "LIB": str(ort_ops.library_path())}
    r = run_example(example, *[subst.get(a, a) for a in args])
    assert r.returncode == 1 and r.stderr.startswith("bmoe_generate: ") and message in r.stderr, r.stderr
