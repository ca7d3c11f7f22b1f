"""Merge one session's device calls (dump_metrics output) into benchmarks/reproduce/results.json (no weights).

results.json as committed (session 2 on top of session 1's file, the one committed in 5abc4fb; run on its own
output the command would add a third session):

    S=runs/session3   # session 2's calls: call2 = 2.1, call4 = 2.2, call5 = 2.3 (the collection call)
    python benchmarks/reproduce/merge_runs.py $S/call5/results_raw.json \
        --call $S/call2/results_raw.json --call $S/call4/results_raw.json --call $S/call5/results_raw.json \
        --previous benchmarks/reproduce/results.json

The first argument is the state after the session's last call. Each --call is the state after one call, in order:
a run took part in a call if that call's state holds it and it was not already finished before it (a run that
ended in call 1 is not resumed in call 2). Calls are labelled "SESSION.CALL" ("2.1" is session 2's first call);
CALLS holds what happened in each of this session's calls. Every run the session's commands list but no call
reached is recorded as not started.

--previous keeps an earlier results.json: its sessions (a file from before sessions existed becomes session 1,
its calls 1, 2, 3 become "1.1", "1.2", "1.3") and its complete runs; runs it lists as stopped or not started are
dropped (their checkpoints stayed on that session's machine, so a later session starts them from scratch); a run
some call of this session ran replaces the previous record, one it listed but never reached does not. Session 1's
file was written by this tool's first version
(`git show 5abc4fb:benchmarks/reproduce/merge_runs.py`).

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

# This session's machine and calls, as the device tool and the calls' own logs reported them (UTC). Call 2's
# runner.log was lost; its per-run logs (logs.tgz) show every stopped run resuming at the step it stopped at.
MACHINE = "nvidia-h200-x2: 2 × NVIDIA H200 (143,771 MiB each), 32 CPU cores"
CALLS = [
    {"utc": "16:27–16:36", "concurrency": "after a CPU benchmark (88 s) and a GPU throughput benchmark on GPU 0 "
     "(~100 s): all 23 runs at once from step 0 at 16:29:42, 12 on GPU 0 and 11 on GPU 1",
     "end": "ts_butterfly_n8_s2 finished at 16:30:42; deadline at 16:35:28: the 22 runs still training got SIGTERM "
            "and wrote resumable checkpoints"},
    {"utc": "16:36–16:44", "concurrency": "the 22 stopped runs resumed from their checkpoints (exact resume: RNG "
     "states restored)", "end": "every run reached its last step"},
    {"utc": "16:44", "concurrency": "none", "end": "collection only: the runner found every quality run finished "
     "and trained nothing; dump_metrics wrote the final state"},
]
STEP_MODE = ("--cuda-graphs (the training step as one CUDA graph) except the dense FFNs d_ff 106/211 "
             "(eager: d_ff not a multiple of 8); each run's metrics.cuda_graphs says which")


def _command(line: str) -> str:
    """commands.txt lines read 'train cuda --out …' (a slice of the argv one item short): restore '--device'."""
    return re.sub(r"^(python -m bmoe_runtime\.cli train) cuda ", r"\1 --device cuda ", line)


def _run_name(command: str) -> str:
    return re.search(r"--out (\S+)\.pt", command).group(1)


def merge(final: dict, per_call: list[dict], session: int) -> tuple[dict, dict[str, str]]:
    """This session's runs and {run: command}."""
    label = [f"{session}.{i}" for i in range(1, len(per_call) + 1)]
    runs = {}
    for name, run in final["runs"].items():
        calls, done_before = [], False
        for i, state in enumerate(per_call):
            if name in state["runs"] and not done_before:
                calls.append(label[i])
            done_before = done_before or state["runs"].get(name, {}).get("complete", False)
        metrics = dict(run["metrics"])
        if "train_curve" in metrics:
            curve = metrics["train_curve"]
            metrics["train_curve"] = curve[CURVE_EVERY - 1::CURVE_EVERY]
            metrics["train_curve_every"] = f"every {CURVE_EVERY}th logged point (of {len(curve)})"
        # train_seconds counts only the last process of a resumed run, under sharing: not kept as a speed
        metrics.pop("train_seconds", None)
        runs[name] = {k: run[k] for k in ("config", "complete", "steps_done", "memory_bytes")}
        runs[name].update(metrics=metrics, calls=calls, status="complete" if run["complete"] else "stopped")
        if not run["complete"]:
            runs[name]["reason"] = (f"stopped by the deadline of call {calls[-1]}, the last call of session "
                                    f"{session} that ran it; not resumed in that session")
    commands = {_run_name(c): c for state in (*per_call, final) for c in map(_command, state["commands"])}
    for name in commands.keys() - runs.keys():
        runs[name] = {"complete": False, "steps_done": 0, "calls": [], "status": "not started",
                      "reason": f"never started in session {session}"}
    return runs, commands


def previous_sessions(prev: dict) -> tuple[list[dict], dict, dict[str, str]]:
    """An earlier results.json's sessions, complete runs and their commands; a file from before sessions
    existed (top-level machine/gpu/calls, integer call numbers) is read as session 1."""
    if "sessions" in prev:
        sessions, runs = prev["sessions"], prev["runs"]
    else:
        calls = [{**c, "call": f"1.{c['call']}"} for c in prev["calls"]]
        sessions = [{"session": 1, "machine": prev["machine"], "gpu": prev["gpu"],
                     "steps": "eager (no CUDA graphs, no compile)", "calls": calls}]
        runs = {k: {**r, "calls": [f"1.{c}" for c in r["calls"]]} for k, r in prev["runs"].items()}
    kept = {k: r for k, r in runs.items() if r["complete"]}
    commands = {_run_name(c): c for c in prev["commands"]}
    return sessions, kept, {k: commands[k] for k in kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("final", type=Path, help="state after the session's last call")
    ap.add_argument("--call", type=Path, action="append", required=True, help="state after each call, in order")
    ap.add_argument("--previous", type=Path, help="an earlier results.json to keep (its sessions and complete runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    if len(a.call) != len(CALLS):
        ap.error(f"CALLS describes {len(CALLS)} calls of this session; got {len(a.call)} --call states")
    sessions, runs, commands = previous_sessions(json.loads(a.previous.read_text())) if a.previous else ([], {}, {})
    final = json.loads(a.final.read_text())
    session = len(sessions) + 1
    new_runs, new_commands = merge(final, [json.loads(p.read_text()) for p in a.call], session)
    sessions.append({"session": session, "machine": MACHINE, "gpu": final["gpu"], "steps": STEP_MODE,
                     "calls": [{"call": f"{session}.{i}", **c} for i, c in enumerate(CALLS, 1)]})
    for name, run in new_runs.items():
        if run["calls"] or name not in runs:  # a run this session listed but never reached keeps its earlier record
            runs[name] = run
            commands[name] = new_commands[name]
    data = {"issue": 15, "sessions": sessions, "commands": [commands[k] for k in sorted(runs) if k in commands],
            "runs": dict(sorted(runs.items()))}
    a.out.write_text(json.dumps(data, indent=1) + "\n")
    ran = sum(bool(r["calls"]) for r in new_runs.values())
    print(f"{len(data['runs'])} runs ({ran} ran in session {session}) -> {a.out} ({a.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
