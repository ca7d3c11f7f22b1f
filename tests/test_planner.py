"""The memory planner: arithmetic on a hand-computed case, refusals, `bmoe plan`, and a real run
whose measured peak RSS is compared with the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bmoe_runtime import default_model_dir

from bmoe_runtime.cli import main_cli
from bmoe_runtime.planning.devices import resolve_device, validate
from bmoe_runtime.errors import BmoeError
from bmoe_runtime.format.manifest import read_manifest
from ops_reference import use_ort
from bmoe_runtime.planning.planner import MIB, SAFETY_MARGIN, Settings, make_plan, refusal

REPO = Path(__file__).resolve().parents[1]
OVERHEAD = (100 * MIB, "given")
DEVICE = validate({"arch": "aarch64", "ram_mb": 1024, "reserved_fraction": 0.5, "mem_bandwidth_gbs": 1,
                   "storage_read_mbs": 100, "storage_latency_ms": 1, "cores": 2, "isa": ["neon"]}, "toy", "toy.toml")


def tensor(kind: str, shape: list[int], nbytes: int) -> dict:
    return {"kind": kind, "shape": shape, "bytes": nbytes}


def synthetic_manifest(n: int = 4) -> dict:
    """d=8, d_ff=16, H=2, L=2, V=16, N=n experts, k=2; fp16 angles: θ over 16 → [n, 4, 8], φ over 8 → [n, 3, 4]."""
    cfg = {"vocab_size": 16, "d_model": 8, "n_layers": 2, "n_heads": 2, "d_ff": 16, "n_experts": n, "top_k": 2,
           "max_seq": 32, "variant": "butterfly", "expert_form": "paper"}
    tensors = {"lm.tok_emb.weight": tensor("embeddings", [16, 8], 512),
               "lm.pos_emb.weight": tensor("embeddings", [32, 8], 1024)}
    tables = []
    for i in range(2):
        for side, shape, per in (("theta", [n, 4, 8], 64), ("phi", [n, 3, 4], 24)):
            name = f"lm.blocks.{i}.moe.experts.{side}_angles"
            tensors[name] = tensor("angles", shape, n * per)
            tables.append({"tensor": name, "experts": n, "expert_bytes": per})
    return {"kind": "lm", "config": cfg, "tensors": tensors, "angle_tables": tables,
            "bytes_by_kind": {"embeddings": 1536, "attention": 2048, "shared_projection": 1024, "prototypes": 192,
                              "router": 256, "norms": 160, "angles": 2 * n * 88}}


# Hand-computed (see docs/planner.md for the terms):
#   resident weights 1536 + 2048 + 1024 + 192 + 256 + 160 = 5216; one expert's angles, both layers: 2·(64 + 24) = 176
#   ort cos/sin tables per expert: θ 4·16·(4+4) = 512, φ 4·8·(3+3) = 192, two layers: 1408 (the streamed cache);
#     resident: the tables of ≤ 8 experts of one node a call, computed from the angles: min(8, N)·512
#   KV = 2·L·ctx·d·4 = 4096, held twice during a step: 8192
#   activations, ort (1 layer alive), 32 tokens: per token 11d + N + 5·H·ctx + 2kd + 3k·d_ff + 2·d_ff = 572,
#     + 4d + V = 48 → 620 floats; 32·620 + V·d = 19968 floats = 79872 bytes
#   resident peak = 100 MiB + 5216 + 8192 + 79872 + 4·512 + c·176 = 104950880 + 2048 + 176·c
def test_hand_computed_plan_all_resident():
    p = make_plan(synthetic_manifest(), DEVICE, Settings("ort"), overhead=OVERHEAD)
    assert p.settings["context"] == 32 and p.settings["prefill"] == 32
    assert p.expert_angle_bytes == 176 and p.moe_layers == 2
    assert p.components["angles: cos/sin tables of ≤ 8 experts a call (ort op)"] == 4 * 512
    assert p.components["KV cache (past + present)"] == 8192
    assert p.components["activations (32-token step)"] == 79872
    # resident: angles 176 B an expert + 4 θ tables; streamed (smallest plan): only the cached tables
    assert p.peak_bytes == 104950880 + SAFETY_MARGIN + 2048 + 4 * 176
    assert p.smallest_peak_bytes == 104950880 + SAFETY_MARGIN + 2 * 1408
    assert p.budget_bytes == 512 * MIB and p.fits and not p.streaming and p.cache_experts == 4
    assert p.streamed_bytes_per_token == 0 and p.expected_misses_per_token == 0
    # read per token: weights 5216 − 1536 + tok_emb 512 + one pos row 32 = 4224; k experts' angles 352;
    # KV at mean fill 2048
    assert p.ram_read_bytes_per_token == 4224 + 352 + 2048
    assert p.estimate_tokens_per_s == pytest.approx(1e9 / 6624)


def test_hand_computed_plan_with_streaming():
    # N = 16 (with N = 4 a streamed cache of fp32 tables costs more than all angles resident): activations
    # 32·(584 + 48) + 128 = 20352 floats; base = 100 MiB + 5216 + 8192 + 81408 = 104952416;
    # all resident = base + 16·176 + 8·512 = base + 6912; streamed = base + c·1408.
    base = 104952416 + SAFETY_MARGIN
    budget = base + 4 * 1408 - 1  # one byte short of a 4-expert cache: 3 of 16 experts a layer, streamed
    p = make_plan(synthetic_manifest(16), DEVICE, Settings("ort"), budget, OVERHEAD)
    assert p.fits and p.streaming and p.cache_experts == 3 and p.peak_bytes == base + 3 * 1408
    # uniform routing: each of the k chosen experts misses with probability 1 − c/N
    assert p.expected_misses_per_token == pytest.approx(2 * 2 * 13 / 16)
    assert p.streamed_bytes_per_token == pytest.approx(2 * 13 / 16 * 176)
    # 6624 B at 1 GB/s + 286 B at 100 MB/s + 3.25 misses × 2 tables × 1 ms
    assert p.estimate_tokens_per_s == pytest.approx(1 / (6624 / 1e9 + 286 / 1e8 + 6.5e-3))


def test_hand_computed_numba_plan():
    # numba: 2 copies of weights and angles, every layer's intermediates alive (per token 2·572 + 48 = 1192 floats),
    # load transient = one more copy of everything loaded
    p = make_plan(synthetic_manifest(), DEVICE, Settings("numba", context=32), overhead=OVERHEAD)
    act = 4 * (32 * 1192 + 128)
    assert p.components["activations (32-token step)"] == act
    assert p.load_transient_bytes == 5216 + 4 * 176
    assert p.peak_bytes == 100 * MIB + SAFETY_MARGIN + 2 * (5216 + 4 * 176) + max(5216 + 4 * 176, 8192 + act)


def test_too_small_budget_is_refused():
    p = make_plan(synthetic_manifest(), DEVICE, Settings("ort"), 100 * MIB, OVERHEAD)
    assert not p.fits and p.cache_experts == 2
    msg = refusal(p)
    assert msg.startswith("model does not fit toy: even the smallest plan (angles of 2 experts a layer in RAM) "
                          "peaks at 108.1 MiB, the budget is 100.0 MiB (--budget-mb)")
    assert "\n" not in msg


@pytest.mark.parametrize("kw, msg", [
    ({"settings": Settings("ort", context=33)}, "context 33 is outside [1, 32]"),
    ({"settings": Settings("tpu")}, "unknown backend 'tpu'"),
    ({"budget_bytes": 2048 * MIB}, "exceeds toy's 1024 MiB of RAM")])
def test_bad_settings(kw, msg):
    args = {"settings": Settings("ort"), "budget_bytes": None, **kw}
    with pytest.raises(BmoeError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        make_plan(synthetic_manifest(), DEVICE, args["settings"], args["budget_bytes"], OVERHEAD)


def test_plan_cli_on_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")  # skip the probe: this test is about the CLI
    r = CliRunner().invoke(main_cli, ["plan", "--device", "rpi5", "--backend", "numba", "--context", "128",
                                      "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "plan: " in r.output and "on rpi5 (numba backend, context 128" in r.output
    cfg = read_manifest(default_model_dir(), verify=False)["config"]
    n, layers = cfg["n_experts"], cfg["n_layers"]
    assert f"angle cache: {n} of {n} experts a layer × {layers} layers" in r.output
    assert "ESTIMATE decode on rpi5" in r.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["fits"] and p["cache_experts"] == n and p["settings"]["context"] == 128
    assert p["components"]["runtime (numba; given)"] == 300 * MIB
    assert p["peak_bytes"] == p["all_resident_peak_bytes"] > p["smallest_peak_bytes"]


def test_plan_cli_refusal(monkeypatch):
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")
    r = CliRunner().invoke(main_cli, ["plan", "--device", "rpi4", "--budget-mb", "200"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: " in r.output and "does not fit rpi4" in r.output and "the budget is 200.0 MiB" in r.output


@pytest.mark.parametrize("backend", ["ort", "numba"])
def test_run_streams_under_a_tight_budget(tmp_path, monkeypatch, backend):
    """A budget below the all-resident peak streams angles: same tokens as the resident run, counters move."""
    if backend == "ort" and not use_ort():
        pytest.skip("libbmoe_ops.so is not built")
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")
    manifest = read_manifest(default_model_dir(), verify=False)
    s = Settings(backend, context=14, prefill=6)  # "ROMEO:" is 6 byte tokens, + 8 new
    plan = make_plan(manifest, resolve_device("rpi5"), s)
    budget_mb = (plan.smallest_peak_bytes + plan.all_resident_peak_bytes) / 2 / MIB
    reports = {}
    for name, extra in (("resident", []), ("streamed", ["--budget-mb", repr(budget_mb)])):
        r = CliRunner().invoke(main_cli, ["run", "--backend", backend, "--device", "rpi5", "-n", "8", "--temperature",
                                          "0", "--json", str(tmp_path / f"{name}.json"), *extra])
        assert r.exit_code == 0, r.output
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    streamed = reports["streamed"]
    assert streamed["text"] == reports["resident"]["text"]
    assert not reports["resident"]["streaming"]["streamed"]
    n = manifest["config"]["n_experts"]
    assert streamed["streaming"]["streamed"] and streamed["plan"]["cache_experts"] < n
    assert streamed["streaming"]["misses"] > 0 and streamed["streaming"]["bytes_read"] > 0


def test_run_refuses_before_loading(monkeypatch):
    monkeypatch.setenv("BMOE_OVERHEAD_MB", "300")
    r = CliRunner().invoke(main_cli, ["run", "--backend", "numba", "--device", "rpi5", "--budget-mb", "100"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "ROMEO" not in r.output  # nothing ran
    assert r.output.startswith("Error: ") and "does not fit rpi5" in r.output and len(r.output.splitlines()) == 1


def test_measured_peak_matches_the_plan(tmp_path):
    """A real run (the overhead probe included): measured peak RSS within 10% of the predicted peak."""
    env = {k: v for k, v in os.environ.items() if k != "BMOE_OVERHEAD_MB"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-m", "bmoe_runtime.cli", "run", "--backend", "numba", "--device", "rpi5",
                        "--json", "out.json", "-n", "8"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out.json").read_text())
    for key in ("device", "on_device", "plan", "memory", "streaming", "estimate"):
        assert key in rep
    mem = rep["memory"]
    assert rep["on_device"] is False and rep["threads"] <= 4 and rep["plan"]["overhead_source"].startswith("measured")
    assert mem["peak_rss_bytes"] >= mem["rss_bytes"] > 0 and mem["pss_bytes"] > 0
    # measured/predicted was 0.985-1.034 over 3 numba + 3 ort runs (docs/testing.md): ±10 % is a 3× margin
    assert 0.90 <= mem["peak_rss_bytes"] / mem["predicted_peak_bytes"] <= 1.10, mem
    assert rep["estimate"]["label"].startswith("ESTIMATE") and rep["estimate"]["decode_tokens_per_s"] > 0
    assert "NOT run on rpi5" in r.stderr and "ESTIMATE for rpi5" in r.stderr
