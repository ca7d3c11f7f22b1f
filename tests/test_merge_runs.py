"""benchmarks/reproduce/merge_runs.py: which calls ran each run (labelled per session), and what an earlier
session's results.json keeps (its sessions and complete runs) when a later session is merged on top."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.reproduce.make_results import device
from benchmarks.reproduce.merge_runs import CALLS, merge, previous_sessions

REPO = Path(__file__).resolve().parents[1]


def cmd(name: str) -> str:
    return f"python -m bmoe_runtime.cli train cuda --out {name}.pt --seed 0"  # commands.txt's form


def raw(steps: dict[str, tuple[int, bool]], names: list[str]) -> dict:
    """dump_metrics output: {run: (steps done, complete)}; names = the runner's command list."""
    runs = {k: {"config": {}, "complete": done, "steps_done": n, "memory_bytes": {}, "rc": 0,
                "metrics": {"train_curve": list(range(30)), "train_seconds": 9.0}} for k, (n, done) in steps.items()}
    return {"runs": runs, "commands": [cmd(k) for k in names], "gpu": "NVIDIA H200, 143771 MiB, 580.159.04"}


def test_calls_are_the_ones_a_run_took_part_in_labelled_by_session():
    names = ["a_s0", "b_s0", "c_s0", "d_s0"]
    call1 = raw({"a_s0": (100, True), "b_s0": (40, False), "c_s0": (50, False)}, names)
    call2 = raw({"a_s0": (100, True), "b_s0": (100, True), "c_s0": (70, False)}, names)
    runs, commands = merge(call2, [call1, call2], session=2)
    assert runs["a_s0"]["calls"] == ["2.1"]  # finished in call 1: not part of call 2
    assert runs["b_s0"]["calls"] == ["2.1", "2.2"] and runs["b_s0"]["status"] == "complete"
    assert runs["c_s0"]["status"] == "stopped" and "call 2.2" in runs["c_s0"]["reason"]
    assert runs["d_s0"] == {"complete": False, "steps_done": 0, "calls": [], "status": "not started",
                            "reason": "never started in session 2"}
    assert commands["d_s0"].startswith("python -m bmoe_runtime.cli train --device cuda --out d_s0.pt")
    m = runs["b_s0"]["metrics"]
    assert m["train_curve"] == [9, 19, 29] and "train_seconds" not in m  # every 10th point; no shared-GPU time


def test_a_file_from_before_sessions_becomes_session_1_and_keeps_only_complete_runs():
    prev = {"machine": "m", "gpu": "g", "calls": [{"call": 1, "utc": "13:53"}, {"call": 2, "utc": "14:01"}],
            "commands": [cmd("a_s0").replace(" cuda ", " --device cuda "), cmd("b_s0")],
            "runs": {"a_s0": {"complete": True, "calls": [1, 2]}, "b_s0": {"complete": False, "calls": [2]}}}
    sessions, runs, commands = previous_sessions(prev)
    assert [c["call"] for c in sessions[0]["calls"]] == ["1.1", "1.2"] and sessions[0]["session"] == 1
    assert runs == {"a_s0": {"complete": True, "calls": ["1.1", "1.2"]}}
    assert list(commands) == ["a_s0"]
    assert previous_sessions({"sessions": sessions, "runs": runs, "commands": list(commands.values())})[1] == runs


def test_cli_merges_a_session_on_top_of_the_previous_file(tmp_path):
    names = ["a_s0", "b_s0"]
    prev = {"issue": 15, "machine": "m", "gpu": "g", "calls": [{"call": 1}], "commands": [cmd("a_s0"), cmd("b_s0")],
            "runs": {"a_s0": {"complete": True, "calls": [1], "metrics": {}},
                     "b_s0": {"complete": False, "calls": [1], "metrics": {}}}}
    states = [raw({"b_s0": (40, False)}, names), raw({"b_s0": (100, True)}, names), raw({"b_s0": (100, True)}, names)]
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"call{i}.json")
        paths[-1].write_text(json.dumps(state))
    (tmp_path / "prev.json").write_text(json.dumps(prev))
    out = tmp_path / "results.json"
    args = [sys.executable, "benchmarks/reproduce/merge_runs.py", str(paths[-1]), "--out", str(out),
            "--previous", str(tmp_path / "prev.json"), *[a for p in paths[:len(CALLS)] for a in ("--call", str(p))]]
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    data = json.loads(out.read_text())
    assert [s["session"] for s in data["sessions"]] == [1, 2]
    assert [c["call"] for c in data["sessions"][1]["calls"]] == [f"2.{i}" for i in range(1, len(CALLS) + 1)]
    assert data["runs"]["a_s0"]["calls"] == ["1.1"] and data["runs"]["b_s0"]["calls"] == ["2.1", "2.2"]
    assert [c.split("--out ")[1].split(".pt")[0] for c in data["commands"]] == ["a_s0", "b_s0"]


def test_device_names_each_seed_groups_calls_and_step_mode():
    data = {"sessions": [{"session": 1, "gpu": "NVIDIA H200, 143771 MiB"}, {"session": 2, "gpu": "NVIDIA H200, x"}]}
    seeds = {0: {"complete": True, "calls": ["1.1", "1.2"], "metrics": {}},  # before metrics.cuda_graphs: eager
             1: {"complete": True, "calls": ["1.1", "1.2"], "metrics": {"cuda_graphs": False}},
             2: {"complete": True, "calls": ["2.1"], "metrics": {"cuda_graphs": True}},
             3: {"complete": False, "calls": ["2.1"], "metrics": {}}}
    assert device(data, seeds) == "1 H200 (shared); s0, s1: calls 1.1+1.2, eager; s2: call 2.1, CUDA graph"
