"""Decode speed and peak RSS of three ways to generate with one export, in one run on one machine:
bmoe-run through ONNX Runtime GenAI, bmoe-run's own Python loop (both on ORT + libbmoe_ops), and the
native C example (examples/c: ORT's C API, no Python). Greedy, one intra-op thread, the variants
interleaved run by run so that machine load hits them alike; medians with min–max.

Decode rate (first token excluded) two ways: tokens per CPU-second (user + system time of the process —
the work, little moved by other processes on a busy machine) and tokens per wall-second. bmoe-run reports
both for its decode steps. The C example reports neither, so its rates come from two runs of N and 8 new
tokens: (N − 8) / (time(N) − time(8)), start-up and prefill cancelling out. Peak RSS: VmHWM (bmoe-run's
report, the example's own line).

    python benchmarks/bench_engines.py [--runs 5] [-n 200] [--model DIR]   # writes runs/bench/engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bmoe_runtime import default_model_dir
from bmoe_runtime.backends import native, ort_ops

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT, SHORT = "ROMEO:", 8
KEYS = ("tok_per_cpu_s", "tok_per_wall_s", "peak_rss_mib")


def build_example(out: Path) -> Path:
    include, ort_lib = native.ort_include_dir(), native.ort_library()
    if not (include and ort_lib and ort_ops.library_path()):
        sys.exit("needs ORT's C header, libonnxruntime and libbmoe_ops (pip install -e .)")
    (out / "libonnxruntime.so.1").symlink_to(ort_lib)
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O2", "-std=c11", "-o", out / "bmoe_generate", ROOT / "examples/c/bmoe_generate.c",
                    f"-I{include}", ort_lib, f"-Wl,-rpath,{out}"], check=True)
    return out / "bmoe_generate"


def timed(cmd: list) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, the child's CPU seconds (user + system), and its result."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), r


def measure(cmd_for, n: int, peak_and_text) -> dict:
    """cmd_for(k): the command generating k tokens; peak_and_text(result): (peak RSS MiB, generated text)."""
    wall_s, cpu_s, _ = timed(cmd_for(SHORT))
    wall_l, cpu_l, r = timed(cmd_for(n))
    peak, text = peak_and_text(r)
    return {"tok_per_cpu_s": (n - SHORT) / (cpu_l - cpu_s), "tok_per_wall_s": (n - SHORT) / (wall_l - wall_s),
            "peak_rss_mib": peak, "text": text}


def bmoe_run(engine: str, model: Path, n: int, report: Path) -> dict:
    r = subprocess.run([BIN / "bmoe-run", str(model), "--engine", engine, "--threads", "1", "--temperature", "0",
                        "-n", str(n), "--json", str(report)], capture_output=True, text=True, check=True)
    rep = json.loads(report.read_text())
    return {"tok_per_cpu_s": rep["decode_tokens_per_cpu_s"], "tok_per_wall_s": rep["decode_tokens_per_s"],
            "peak_rss_mib": rep["memory"]["peak_rss_bytes"] / 2**20, "text": r.stdout.rstrip("\n")}


def c_example(exe: Path, model: Path, n: int) -> dict:
    def cmd(k: int) -> list:
        return [exe, str(model), str(ort_ops.library_path()), PROMPT, str(k), "1"]

    return measure(cmd, n, lambda r: (float(re.search(r"peak RSS ([\d.]+) MiB", r.stderr).group(1)),
                                      re.search(r"^text: (.*)\Z", r.stdout, re.S | re.M).group(1).rstrip("\n")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-n", type=int, default=200, help="new tokens a run")
    ap.add_argument("--model", type=Path, default=default_model_dir())
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "engines.json")
    args = ap.parse_args()
    variants = {"bmoe-run, GenAI engine": "genai", "bmoe-run, Python loop": "loop", "C example (examples/c)": "c"}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_example(Path(tmp))
        load_before = os.getloadavg()
        for run in range(args.runs):
            names = list(variants)
            names = names[run % 3:] + names[:run % 3]  # rotate the order: no variant always runs first
            for name in names:
                how = variants[name]
                res = (c_example(exe, args.model, args.n) if how == "c"
                       else bmoe_run(how, args.model, args.n, Path(tmp) / "report.json"))
                results[name].append(res)
        load_after = os.getloadavg()
    texts = {r["text"] for rs in results.values() for r in rs}
    if len(texts) != 1:
        sys.exit(f"the variants generated different texts: {texts}")
    summary = {name: {key: {"median": statistics.median(r[key] for r in rs), "min": min(r[key] for r in rs),
                            "max": max(r[key] for r in rs)} for key in KEYS}
               for name, rs in results.items()}
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "loadavg_1min_before_after": [load_before[0], load_after[0]], "python": platform.python_version()}
    print(f"{args.model}, greedy, {args.n} new tokens, 1 thread, {args.runs} runs interleaved; "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f} on {machine['cores']} cores")
    print("| engine | decode tok per CPU-second | decode tok per wall-second | peak RSS MiB |")
    print("|---|---|---|---|")
    for name, st in summary.items():
        cells = [f"{st[k]['median']:.{d}f} ({st[k]['min']:.{d}f}–{st[k]['max']:.{d}f})"
                 for k, d in zip(KEYS, (0, 0, 1))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "new_tokens": args.n, "threads": 1, "runs": args.runs,
                                    "machine": machine, "summary": summary, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
