"""Every quality run of docs/results.md (issue 15): 3 seeds each, at the presets' full length, run concurrently on
all GPUs of one machine within a deadline, resumable across machine calls.

    python benchmarks/reproduce/quality_runs.py --data .data --run-dir /tmp/bmoe_runs --out $OUT --deadline 540
    python benchmarks/reproduce/quality_runs.py --list            # the run matrix and its commands, nothing run

Runs start in priority order (the bundled-model candidates, then seed 0 of everything, then seeds 1 and 2) while
fewer than --per-gpu run on each GPU and more than --no-start-after seconds of the deadline are left. At the
deadline every run still training gets SIGTERM: the trainer finishes its step and writes a resumable checkpoint,
so the next call (same --run-dir, the machine still warm) continues it with --resume; finished runs are skipped.
Afterwards the metrics of every checkpoint go to OUT/results_raw.json (benchmarks/reproduce/dump_metrics.py) and
the logs to OUT/logs.tgz.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Run:
    name: str
    args: tuple[str, ...]
    priority: int  # lower starts first
    cuda_graphs: bool = True  # the step as a CUDA graph (2.75× bmoe-train's tokens/s at d512, docs/training.md)

    def command(self, ckpt: Path, resume: bool, device: str = "cuda") -> list[str]:
        graphs = ["--cuda-graphs" if self.cuda_graphs else "--no-cuda-graphs"] if device == "cuda" else []
        return [sys.executable, "-m", "bmoe_runtime.cli", "train", "--device", device, "--out", str(ckpt),
                *self.args, *graphs, *(["--resume"] if resume else [])]


def matrix(data: Path) -> list[Run]:
    wt, ts = str(data / "wikitext-2"), str(data / "tinyshakespeare" / "input.txt")
    # WikiText-2, preset `paper` at its own 6000 steps (32 × 128 tokens a step: 24.6M tokens a run)
    wt_base = ("--data", wt, "--preset", "paper", "--tokenizer", "bpe", "--bpe-vocab", "8192", "--expert-form", "paper")
    wt_runs: dict[str, tuple[str, ...]] = {}
    for n in (8, 64):
        for v in ("dense", "ternary", "static", "butterfly"):
            wt_runs[f"wt_{v}_n{n}"] = ("--variant", v, "--experts", str(n))
    wt_runs["wt_butterfly_n256"] = ("--variant", "butterfly", "--experts", "256")
    # dense FFNs (no MoE) of one butterfly N=8 layer's expert bytes (docs/results.md, Setup)
    wt_runs["wt_densefnn_ff106"] = ("--variant", "dense", "--experts", "1", "--top-k", "1", "--d-ff", "106")
    wt_runs["wt_densefnn_ff211"] = ("--variant", "dense", "--experts", "1", "--top-k", "1", "--d-ff", "211")
    # the whole model compressed: attention and the shared projection ternary too (QAT); 4-bit and int8 options are
    # post-training (bmoe-export) and are measured on these checkpoints afterwards
    wt_runs["wt_butterfly_n64_ternary_attn_proj"] = ("--variant", "butterfly", "--experts", "64",
                                                     "--ternary", "attn", "--ternary", "proj")
    # TinyShakespeare bytes, preset `tiny` (d 128, 2 layers, N=8) for 2500 steps
    ts_base = ("--data", ts, "--preset", "tiny", "--tokenizer", "byte", "--expert-form", "paper", "--steps", "2500",
               "--eval-every", "500")
    ts_runs = {f"ts_{v}_n8": ("--variant", v, "--experts", "8") for v in ("dense", "butterfly")}
    # candidates for the bundled model: character-level, nanoGPT's shakespeare_char shape (6 layers, d 384, 6 heads,
    # seq 256, batch 64, 5000 steps) with ButterflyMoE FFNs, exported with the compression options on. The first
    # try (dropout 0.2, last step kept) overfit after ~3500 steps: these keep the weights of the lowest valid loss,
    # evaluated on the whole valid split every 250 steps, at dropout 0.2 and 0.3
    bundled = ("--data", ts, "--preset", "tiny", "--tokenizer", "byte", "--variant", "butterfly", "--expert-form",
               "paper", "--d-model", "384", "--heads", "6", "--d-ff", "1536", "--experts", "8", "--top-k", "2",
               "--seq", "256", "--batch", "64", "--lr", "1e-3", "--steps", "5000", "--layers", "6",
               "--eval-every", "250", "--eval-tokens", "0", "--keep-best", "--seed", "0")
    runs = [Run(f"bundled_l6_do{d}", (*bundled, "--dropout", f"0.{d}"), 0) for d in (2, 3)]
    for seed in SEEDS:
        for name, extra in wt_runs.items():
            # the dense FFNs' d_ff (106, 211) is no multiple of 8: their per-expert step cannot be captured
            runs.append(Run(f"{name}_s{seed}", (*wt_base, *extra, "--seed", str(seed)), 1 + seed,
                            cuda_graphs=not name.startswith("wt_densefnn")))
        for name, extra in ts_runs.items():
            runs.append(Run(f"{name}_s{seed}", (*ts_base, *extra, "--seed", str(seed)), 1 + seed))
    return sorted(runs, key=lambda r: r.priority)


def finished(ckpt: Path) -> bool:
    if not ckpt.exists():
        return False
    import torch  # checkpoints are written atomically: one that exists is whole
    return "test" in torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("metrics", {})


def prepare_tokens(data: Path, cache: Path) -> None:
    """Tokenize each corpus once (the BPE too) before the runs start, so they do not race to build the cache."""
    sys.path.insert(0, str(ROOT))
    from bmoe_runtime.train.shards import prepare_tokens as prepare
    from bmoe_runtime.train.data import scan_corpus
    from bmoe_runtime.train.trainer import build_tokenizer
    for corpus, kind in ((data / "wikitext-2", "bpe"), (data / "tinyshakespeare" / "input.txt", "byte")):
        source = scan_corpus(str(corpus))
        prepare(source, build_tokenizer(kind, source, 8192, str(cache)), str(cache))


def gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return 1
    return max(1, sum(line.startswith("GPU ") for line in out.splitlines()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / ".data")
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/bmoe_runs"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/bmoe_out")))
    ap.add_argument("--deadline", type=float, default=540, help="seconds from now when running runs are stopped")
    ap.add_argument("--no-start-after", type=float, default=150, help="start no run with fewer seconds left")
    ap.add_argument("--per-gpu", type=int, default=10, help="runs at once on each GPU")
    ap.add_argument("--only", default="", help="comma-separated name prefixes to run (default: all)")
    ap.add_argument("--device", default="cuda", help="cpu: try the orchestration on a machine without a GPU")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    runs = [r for r in matrix(a.data) if not a.only or r.name.startswith(tuple(a.only.split(",")))]
    if a.list:
        for r in runs:
            print(r.name, " ".join(r.command(Path(f"{r.name}.pt"), False)[2:]))
        return
    t_end = time.time() + a.deadline
    a.run_dir.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.run_dir / "token-cache"
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "BMOE_CACHE_DIR": str(cache)}
    prepare_tokens(a.data, cache)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout if a.device == "cuda" else "no GPU"
    import torch
    (a.run_dir / "gpu.txt").write_text(f"{smi.strip()}\ntorch {torch.__version__}\n")
    (a.run_dir / "commands.txt").write_text("".join(
        "python -m bmoe_runtime.cli train " + " ".join(r.command(Path(f"{r.name}.pt"), False)[4:]) + "\n"
        for r in runs))
    n_gpu = gpus()
    queue = [r for r in runs if not finished(a.run_dir / f"{r.name}.pt")]
    print(f"{len(runs) - len(queue)} of {len(runs)} runs already finished; {len(queue)} to go on {n_gpu} GPU(s)",
          flush=True)
    live: dict[str, tuple[subprocess.Popen, int]] = {}
    while queue or live:
        for name, (proc, _) in list(live.items()):
            if proc.poll() is not None:
                print(f"{time.strftime('%H:%M:%S')} {name} exited {proc.returncode}", flush=True)
                (a.run_dir / f"{name}.rc").write_text(str(proc.returncode))
                del live[name]
        left = t_end - time.time()
        while queue and left > a.no_start_after and len(live) < a.per_gpu * n_gpu:
            r = queue.pop(0)
            gpu = min(range(n_gpu), key=lambda g: sum(1 for _, gg in live.values() if gg == g))
            ckpt = a.run_dir / f"{r.name}.pt"
            resume = ckpt.exists()
            with open(a.run_dir / f"{r.name}.log", "a") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(r.command(ckpt, resume, a.device), stdout=log, stderr=subprocess.STDOUT,
                                        cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": str(gpu)})
            live[r.name] = (proc, gpu)
            print(f"{time.strftime('%H:%M:%S')} started {r.name} on GPU {gpu}{' (resumed)' if resume else ''}",
                  flush=True)
        if left <= 0 and live:
            print(f"deadline: stopping {len(live)} runs at their next step (resumable)", flush=True)
            for proc, _ in live.values():
                proc.send_signal(signal.SIGTERM)
            stop_by = time.time() + 90
            for proc, _ in live.values():
                try:
                    proc.wait(max(1.0, stop_by - time.time()))
                except subprocess.TimeoutExpired:
                    proc.kill()
            t_end = float("inf")
            queue.clear()
            continue
        if left <= a.no_start_after:  # too late to start the rest: they wait for the next call
            queue.clear()
        time.sleep(2)
    collect(a.run_dir, a.out)


def collect(run_dir: Path, out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce/dump_metrics.py"), str(run_dir),
                    str(out / "results_raw.json")], check=False, cwd=ROOT)
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        for log in sorted(run_dir.glob("*.log")):
            # tqdm redraws with \r: keep every line that is not a progress redraw, and one redraw in 50
            lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
            kept = [ln for i, ln in enumerate(lines) if "step/s" not in ln and "s/step" not in ln or i % 50 == 0]
            txt = run_dir / f"{log.name}.txt"
            txt.write_text("\n".join(kept) + "\n")
            tar.add(txt, arcname=txt.name)
        for extra in ("commands.txt", "gpu.txt"):
            if (run_dir / extra).exists():
                tar.add(run_dir / extra, arcname=extra)


if __name__ == "__main__":
    main()
