"""The memory budget is a promise: in a planned run, measured peak RSS never exceeds it.

Real `bmoe-run` processes (the overhead is measured inside each one), at three budgets from the tightest plan
(the angle cache holds top_k experts a layer) to all angles resident, with --strict-budget: both backends with
bmoe's own loop, and ORT with the engine bmoe-run picks (GenAI when installed; bmoe's loop for streamed plans).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmoe_runtime.backends import ort_ops

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def bmoe_run(tmp_path: Path, *args: str, env_extra: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "BMOE_OVERHEAD_MB"} | (env_extra or {})
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / "report.json"
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "bmoe_runtime.cli", "run", "--device", "rpi5", "-n", "6",
                        "--temperature", "0", "--json", str(out), *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=600)
    return r, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.parametrize("backend, engine", [("ort", "loop"), ("numba", "loop"), ("ort", "auto")])
def test_measured_peak_stays_under_three_budgets(tmp_path, backend, engine):
    if backend == "ort" and not ort_ops.available():
        pytest.fail("libbmoe_ops.so is not built")
    r, rep = bmoe_run(tmp_path, "--backend", backend, "--engine", engine)
    assert r.returncode == 0, r.stderr
    plan = rep["plan"]
    tight, loose = plan["smallest_peak_bytes"], plan["all_resident_peak_bytes"]
    # +1 MiB: each run measures its own overhead, which moves by a few hundred KiB from run to run
    budgets = [tight + MIB, (tight + loose) // 2 + MIB, loose + MIB]
    for budget in budgets:
        r, rep = bmoe_run(tmp_path, "--backend", backend, "--engine", engine, "--budget-mb", repr(budget / MIB),
                          "--strict-budget")
        assert r.returncode == 0, r.stderr
        peak = rep["memory"]["peak_rss_bytes"]
        assert peak <= rep["plan"]["budget_bytes"], (budget / MIB, peak / MIB)
        assert rep["plan"]["overhead_source"].startswith("measured: peak RSS of this process")
    assert rep["streaming"]["streamed"] is False  # the loosest budget keeps every angle resident


def test_a_breached_budget_is_loud_and_strict_fails(tmp_path):
    """An overhead given far too small lets the plan fit a budget the run cannot keep: reported, and an error."""
    args = ["--backend", "numba", "--budget-mb", "40"]
    r, rep = bmoe_run(tmp_path, *args, env_extra={"BMOE_OVERHEAD_MB": "1"})
    assert r.returncode == 0 and "BUDGET EXCEEDED: measured peak RSS" in r.stderr
    r, _ = bmoe_run(tmp_path, *args, "--strict-budget", env_extra={"BMOE_OVERHEAD_MB": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: BUDGET EXCEEDED")
