"""Planned model directories (bmoe plan --write, issue 14 part 3): angles stream from angles.bin as the graph
says, with no rewrite at load, so ONNX Runtime GenAI streams them too. Checked against the Numba runtime on
the export itself (resident angles: an independent path), for the bundled model and a BPE model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bmoe_runtime import default_model_dir
from bmoe_runtime.backends import ort_ops
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_manifest
from bmoe_runtime.runtime import streaming
from bmoe_runtime.runtime.generate import Generator
from bmoe_runtime.runtime.planned_dir import write_planned
from bmoe_runtime.runtime.session import ModelSession
from untrusted_dirs import manifest, resign, write_manifest

import onnxruntime_genai as og  # noqa: E402  (the [genai] extra, part of [test])
from bmoe_runtime.runtime.genai_engine import GenAIGenerator  # noqa: E402

BIN = Path(sys.executable).parent
N_EXPERTS = json.loads((default_model_dir() / "manifest.json").read_text())["config"]["n_experts"]
PROMPT, N, CACHE = "ROMEO: héllo, wörld", 20, 2
PLAN = {"device": "test", "runtime": "python", "budget_bytes": 1 << 30, "planned_peak_bytes": 1 << 29}


def bmoe(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / tool, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    """The bundled model planned by the CLI for a budget under its all-resident peak: 2 experts a layer."""
    d = tmp_path_factory.mktemp("planned")
    r = bmoe("bmoe", "plan", "--device", "host", "--overhead-mb", "100", "--json", str(d / "plan.json"))
    assert r.returncode == 0, r.stderr
    plan = json.loads((d / "plan.json").read_text())
    budget = plan["smallest_peak_bytes"] / 2**20 + 0.005  # only the smallest cache fits (an expert: ~0.02 MiB)
    r = bmoe("bmoe", "plan", "--device", "host", "--overhead-mb", "100", "--budget-mb", f"{budget:.4f}",
             "--write", str(d / "out"))
    assert r.returncode == 0 and f"2/{N_EXPERTS} experts a layer cached" in r.stdout, r.stderr
    return d / "out"


def tokens(gen, n: int = N) -> list[int]:
    ids = gen.tokenizer.encode(PROMPT)
    return list(gen.tokens(ids, min(n, gen.cfg["max_seq"] - len(ids))))


def test_planned_directory_holds_the_streamed_form(planned):
    m = read_manifest(planned)  # sha256 of every file, schema with the "streamed" field
    src = read_manifest(default_model_dir())
    assert m["streamed"]["cache_slots"] == {t["tensor"]: CACHE for t in src["angle_tables"]}
    assert {n for n in m["files"] if n != "model.onnx"} == {n for n in src["files"] if n != "model.onnx"}
    assert all(m["files"][n] == src["files"][n] for n in m["files"] if n != "model.onnx")  # copied as they were
    graph = onnx.load(str(planned / "model.onnx"), load_external_data=False)
    assert not {t.name for t in graph.graph.initializer} & set(m["streamed"]["cache_slots"])  # never loaded
    rotates = [n for n in graph.graph.node if n.op_type == "ButterflyRotate"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in rotates]
    assert rotates and all(a["angle_file"] == b"angles.bin" and a["angle_file_size"] == m["files"]["angles.bin"]["bytes"]
                           and a["cache_slots"] == CACHE for a in attrs)  # relative: resolved by the op library


@pytest.mark.parametrize("which", ["bundled", "bpe"])
def test_genai_streams_a_planned_directory_with_the_numba_runtimes_tokens(which, planned, bpe_export, tmp_path):
    export = default_model_dir() if which == "bundled" else bpe_export
    if which == "bpe":
        planned = write_planned(bpe_export, tmp_path / "planned", CACHE, PLAN)
    want = tokens(Generator(ModelSession(export, "numba")))  # the export, all angles resident
    streaming.reset("ort")
    genai = GenAIGenerator(planned, threads=1)
    assert genai.tokenizer.decode(genai.tokenizer.encode(PROMPT)) == PROMPT
    assert tokens(genai) == want
    counters = streaming.cache_stats("ort")
    assert counters["misses"] > 0 and counters["bytes_read"] > 0  # GenAI's session streamed the angles
    for backend in ("numba", "ort"):  # bmoe's loop runs the planned graph as written, on both backends
        streaming.reset(backend)
        assert tokens(Generator(ModelSession(planned, backend))) == want
        stats = streaming.cache_stats(backend)
        assert stats["hits"] + stats["misses"] == counters["hits"] + counters["misses"]  # the same look-ups
        if backend == "ort":  # the same kernels as GenAI's session: the same experts, so the same misses.
            # Numba's float32 sums in another order and may pick another expert at a router near-tie (the bundled
            # model has one: 2nd and 3rd logits 1.2e-4 apart in layer 2), so its misses may differ slightly
            assert stats["misses"] == counters["misses"]


def test_bmoe_run_runs_a_planned_directory_on_every_engine(planned):
    out = {}
    for args in (("--engine", "genai"), ("--engine", "loop"), ("--backend", "numba")):
        r = bmoe("bmoe-run", str(planned), "--temperature", "0", "-n", "12", "--threads", "1", "--budget-mb", "400",
                 *args)
        assert r.returncode == 0 and f"angle cache: 2/{N_EXPERTS} experts a layer" in r.stderr, r.stderr
        assert "own loop" not in r.stderr and ("through ONNX Runtime GenAI" in r.stderr) == (args[1] == "genai")
        out[args] = r.stdout
    ref = Generator(ModelSession(default_model_dir(), "numba"))
    want = "ROMEO:" + ref.tokenizer.decode(list(ref.tokens(ref.tokenizer.encode("ROMEO:"), 12))) + "\n"
    assert set(out.values()) == {want}


def test_a_planned_directory_over_the_budget_is_refused(planned):
    r = bmoe("bmoe-run", str(planned), "-n", "4", "--budget-mb", "20")
    assert r.returncode == 1 and "was planned for host with 2 experts a layer cached" in r.stderr, r.stderr
    r = bmoe("bmoe-run", str(planned), "-n", "4", "--lookahead")
    assert r.returncode == 1 and "not for a planned directory" in r.stderr
    with pytest.raises(BmoeError, match="already stream"):
        ModelSession(planned, "ort", angle_cache_slots=4)
    r = bmoe("bmoe", "plan", str(planned), "--write", str(planned.parent / "again"))
    assert r.returncode == 1 and "already a planned directory" in r.stderr


@pytest.fixture
def copy_of(planned, tmp_path) -> Path:
    d = tmp_path / "copy"
    d.mkdir()
    for name in os.listdir(planned):
        (d / name).write_bytes((planned / name).read_bytes())
    return d


def test_planned_directory_without_its_angle_file(copy_of):
    """Copied without angles.bin: bmoe's CLI (either engine) and the op library itself (an ORT status, as a
    C/Java/Swift app or GenAI sees it) say so; nothing crashes."""
    os.unlink(copy_of / "angles.bin")
    for engine in ("genai", "loop"):
        r = bmoe("bmoe-run", str(copy_of), "-n", "4", "--engine", engine)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"Error: {copy_of}: file angles.bin is missing"]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    ort_ops.register(opts, model_dir=copy_of)
    with pytest.raises(Exception, match="angles.bin") as err:
        ort.InferenceSession(str(copy_of / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    assert type(err.value).__module__.startswith("onnxruntime")
    config = og.Config(str(copy_of))  # GenAI directly, as an app loads it
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {ort_ops.MODEL_DIR_KEY: str(copy_of)}}}}))
    with pytest.raises(RuntimeError, match="angles.bin"):
        og.Model(config)


def test_streamed_nodes_must_match_the_manifest(copy_of):
    m = manifest(copy_of)
    first = next(iter(m["streamed"]["cache_slots"]))
    m["streamed"]["cache_slots"][first] = 3  # the graph caches 2
    write_manifest(copy_of, m)
    resign(copy_of)
    r = bmoe("bmoe-run", str(copy_of), "-n", "4", "--engine", "loop")
    assert r.returncode == 1 and "does not match the manifest's streamed angle tables" in r.stderr, r.stderr


def test_plan_write_follows_the_export_directory_rules(planned, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    r = bmoe("bmoe", "plan", "--device", "host", "--write", str(user))
    assert r.returncode == 1 and "not a bmoe export" in r.stderr and (user / "notes.txt").read_text() == "keep"
    out = tmp_path / "p"
    assert bmoe("bmoe", "plan", "--device", "host", "--write", str(out)).returncode == 0
    assert read_manifest(out)["streamed"]["cache_slots"]  # all fits: every expert cached, each read once
    r = bmoe("bmoe", "plan", "--device", "host", "--write", str(out))
    assert r.returncode == 1 and "--force" in r.stderr
    assert bmoe("bmoe", "plan", "--device", "host", "--write", str(out), "--force").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["mine", "p"]  # no stage left behind


def test_genai_app_without_the_model_dir_entry_gets_the_op_librarys_error(planned):
    """GenAI does not set bmoe.model_dir: an app that does not overlay it gets an error naming the entry."""
    from bmoe_runtime.runtime.genai_engine import preload_op_library

    preload_op_library()  # as an app loads libbmoe_ops before GenAI looks for it
    with pytest.raises(RuntimeError, match="bmoe.model_dir"):
        og.Model(og.Config(str(planned)))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["cache_slots"].__setitem__("lm.blocks.0.attn.qkv.weight", 2), "is not an angle table"),
    (lambda s: s["cache_slots"].__setitem__(next(iter(s["cache_slots"])), 17), "caches more than its experts"),
    (lambda s: s.pop("cache_slots"), "'cache_slots' is a required property"),
])
def test_a_malformed_streamed_field_is_one_line(copy_of, edit, message):
    m = manifest(copy_of)
    edit(m["streamed"])
    write_manifest(copy_of, m)
    r = bmoe("bmoe-run", str(copy_of), "-n", "4")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr


def test_planned_directory_with_router_lookahead(tmp_path):
    """--lookahead writes the AnglePrefetch nodes too: GenAI and bmoe's loop prefetch alike, tokens unchanged."""
    planned = write_planned(default_model_dir(), tmp_path / "la", CACHE, PLAN, lookahead=True)
    assert read_manifest(planned)["streamed"]["lookahead"] is True
    graph = onnx.load(str(planned / "model.onnx"), load_external_data=False)
    layers = read_manifest(planned)["config"]["n_layers"]
    assert sum(n.op_type == "AnglePrefetch" for n in graph.graph.node) == 2 * (layers - 1)  # θ, φ of layers 1..L-1
    want = tokens(Generator(ModelSession(default_model_dir(), "numba")))
    counters = []
    for make in (lambda: GenAIGenerator(planned, threads=1), lambda: Generator(ModelSession(planned, "ort"))):
        streaming.reset("ort")
        assert tokens(make()) == want
        counters.append(streaming.cache_stats("ort"))
    assert counters[0] == counters[1] and counters[0]["prefetches"] > 0 and counters[0]["prefetch_hits"] > 0
