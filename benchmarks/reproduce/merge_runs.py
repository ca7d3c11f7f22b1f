"""Merge the device calls' dump_metrics output into benchmarks/reproduce/results.json (no weights).

    python benchmarks/reproduce/merge_runs.py runs/quality/results_raw.json \
        --call runs/quality/results_raw_call1.json --call runs/quality/results_raw.json \
        --runner-log runs/quality/runner.log

The first argument is the state after the last call. Each --call is the state after one call, in order: a run
took part in a call if that call's state holds it and it was not already finished before it (a run that ended in
call 1 is not resumed in call 2). Every run quality_runs.py lists but no call reached is recorded as not started.
Training curves keep every 10th logged point (every 100 steps) so the file stays small.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks/reproduce/results.json"
CURVE_EVERY = 10

# What the device tool reported for each call (its replies; runner.log has call 2's own timeline).
MACHINE = "nvidia-h200-x2: 2 × NVIDIA H200 (143,771 MiB each), 32 CPU cores"
CALLS = [
    {"call": 1, "utc": "13:53–14:01", "concurrency": "22 runs at once, 11 per GPU",
     "end": "deadline: running runs got SIGTERM and wrote resumable checkpoints"},
    {"call": 2, "utc": "14:01–14:10", "concurrency": "up to 26 runs at once, 13 per GPU; stopped runs resumed "
     "from their checkpoints (exact resume: RNG states restored)",
     "end": "deadline: running runs got SIGTERM and wrote resumable checkpoints"},
    {"call": 3, "utc": None, "concurrency": "none",
     "end": "started no run (a runner bug, fixed afterwards in quality_runs.py); then the session's device time "
            "ran out, so nothing was resumed again"},
]
STOPPED = ("stopped by the deadline of the last call that ran it; not resumed because call 3 started no run and "
           "the device time ran out")


def _command(line: str) -> str:
    """commands.txt lines read 'train cuda --out …' (a slice of the argv one item short): restore '--device'."""
    return re.sub(r"^(python -m bmoe_runtime\.cli train) cuda ", r"\1 --device cuda ", line)


def merge(final: dict, per_call: list[dict], started_in_last: set[str]) -> dict:
    runs = {}
    for name, run in final["runs"].items():
        calls, done_before = [], False
        for i, state in enumerate(per_call, 1):
            if name in state["runs"] and not done_before:
                calls.append(i)
            done_before = done_before or state["runs"].get(name, {}).get("complete", False)
        if name in started_in_last and len(per_call) not in calls:
            calls.append(len(per_call))
        metrics = dict(run["metrics"])
        if "train_curve" in metrics:
            curve = metrics["train_curve"]
            metrics["train_curve"] = curve[CURVE_EVERY - 1::CURVE_EVERY]
            metrics["train_curve_every"] = f"every {CURVE_EVERY}th logged point (of {len(curve)})"
        # train_seconds counts only the last process of a resumed run, under sharing: not kept as a speed
        metrics.pop("train_seconds", None)
        runs[name] = {k: run[k] for k in ("config", "complete", "steps_done", "memory_bytes")}
        runs[name].update(metrics=metrics, calls=calls, status="complete" if run["complete"] else "stopped",
                          **({} if run["complete"] else {"reason": STOPPED}))
    commands = [_command(c) for c in final["commands"]]
    for line in commands:
        name = re.search(r"--out (\S+)\.pt", line).group(1)
        if name not in runs:
            runs[name] = {"complete": False, "steps_done": 0, "calls": [], "status": "not started",
                          "reason": "never started: last in the priority order, and call 2 started no further run "
                                    "before its deadline"}
    return {"issue": 15, "machine": MACHINE, "gpu": final["gpu"], "calls": CALLS, "commands": commands,
            "runs": dict(sorted(runs.items()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("final", type=Path)
    ap.add_argument("--call", type=Path, action="append", required=True, help="state after each call, in order")
    ap.add_argument("--runner-log", type=Path, required=True, help="the last call's runner.log")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    started = set(re.findall(r"started (\S+) on GPU", a.runner_log.read_text()))
    data = merge(json.loads(a.final.read_text()), [json.loads(p.read_text()) for p in a.call], started)
    a.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(data['runs'])} runs -> {a.out} ({a.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
