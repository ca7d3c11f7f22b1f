"""Training throughput on one GPU: steady-state tokens/s and peak memory of the trainer's own step.

The step is the trainer's (bmoe_runtime.train.step): MoELM under bf16 autocast, `make_optimizer`'s
AdamW, gradient clipping; random token batches made on the GPU (vocab 8192, batch 32 × seq 128).
Shapes from issue 13: dense MoE d512/4 layers/N=8 and ButterflyMoE d512/4 layers/N=8, 64, 256 and
d1024/8 layers/d_ff 4096/N=64. Modes (`--modes`): `fused` the eager step (fused CUDA butterfly),
`reference` the same with the PyTorch butterfly, `compiled` the eager step over torch.compile(model.loss)
(the trainer's --compile), `graphed` the trainer's CUDA-graph step (--cuda-graphs), `compiled-graphed`
both. Step times are CUDA-event medians over `--steps` steps after `--warmup`; spread is the
interquartile range. Peak memory is torch.cuda.max_memory_allocated over the timed steps (weights,
AdamW state, activations). `warmup_s` is the time from building the model to the end of the warm-up
steps: it holds torch.compile's compilation and the graph's warm-up and capture.

    python benchmarks/train_throughput.py [--only NAME ...] [--modes fused reference compiled graphed
        compiled-graphed] [--time-budget S] [--profile NAME ...] [--valid-check DATA_DIR]
        [--out runs/train_throughput.json] [--update-docs]

Measurements run mode by mode, shape by shape; with --time-budget none starts after S seconds (those
left out are listed under "skipped" in the results file, which is rewritten after each measurement).

--profile NAME ... adds a torch.profiler summary (GPU time by kernel) of those shapes' fused steps.
--valid-check trains the paper preset for a few hundred steps twice (fused, reference; same
seed, same steps) on DATA_DIR/wikitext-2 and compares validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bmoe_runtime.nn import butterfly  # noqa: E402
from bmoe_runtime.nn.model import ModelConfig, MoELM  # noqa: E402
from bmoe_runtime.train.step import GraphedStep, eager_step  # noqa: E402
from bmoe_runtime.train.trainer import TrainConfig, make_optimizer  # noqa: E402

VOCAB, BATCH, SEQ = 8192, 32, 128
DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"

def markers(block: str) -> tuple[str, str]:
    """The comments around a results block of docs/training.md ("" = the main table)."""
    name = f"train_throughput:{block}" if block else "train_throughput"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


@dataclass(frozen=True)
class Shape:
    name: str
    variant: str
    n_experts: int
    d_model: int = 512
    n_layers: int = 4
    d_ff: int = 2048
    n_heads: int = 8

    def config(self) -> ModelConfig:
        return ModelConfig(vocab_size=VOCAB, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           d_ff=self.d_ff, n_experts=self.n_experts, top_k=2, max_seq=SEQ, variant=self.variant,
                           expert_form="paper")


SHAPES = [
    Shape("dense-d512-N8", "dense", 8),
    Shape("butterfly-d512-N8", "butterfly", 8),
    Shape("butterfly-d512-N64", "butterfly", 64),
    Shape("butterfly-d512-N256", "butterfly", 256),
    Shape("butterfly-d1024-N64", "butterfly", 64, d_model=1024, n_layers=8, d_ff=4096, n_heads=16),
]


MODES = ["fused", "reference", "compiled", "graphed", "compiled-graphed"]


def make_step(shape: Shape, mode: str):
    """The trainer's step (eager or its CUDA graph, over model.loss or its torch.compile) on random batches."""
    torch.manual_seed(0)
    model = MoELM(shape.config()).cuda().train()
    opt = make_optimizer(model, TrainConfig())
    loss_fn = torch.compile(model.loss) if mode.startswith("compiled") else model.loss
    run = GraphedStep(loss_fn, model, opt, 1.0, BATCH, SEQ) if mode.endswith("graphed") else \
        eager_step(loss_fn, model, opt, 1.0)
    g = torch.Generator(device="cuda").manual_seed(0)

    def step() -> None:
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device="cuda", generator=g)
        run(ids[:, :-1], ids[:, 1:], 1e-3)

    return model, opt, step


def measure(shape: Shape, mode: str, warmup: int, steps: int) -> dict:
    butterfly.use_fused(mode != "reference")
    try:
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # every model compiles afresh (past dynamo's recompile limit it would run eagerly)
        t0 = time.perf_counter()
        model, opt, step = make_step(shape, mode)
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        torch.cuda.empty_cache()  # the warm-up's cached blocks; a graph's private pool stays reserved
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            times.append((start, end))
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in times]
        q = statistics.quantiles(ms, n=4)
        med = statistics.median(ms)
        return {"shape": shape.name, "mode": mode, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                "step_ms": med, "step_ms_q1": q[0], "step_ms_q3": q[2], "tokens_per_s": BATCH * SEQ / med * 1e3,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "warmup_s": warm_s}
    finally:
        butterfly.use_fused(True)


def profile(shape: Shape, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    _, _, step = make_step(shape, "fused")
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    table_text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    return f"{table_text}\nwall time (profiled): {wall * 1e3 / steps:.2f} ms per step over {steps} steps"


def valid_check(data_dir: str, steps: int) -> dict:
    """Paper preset, byte tokenizer, same seed and steps: validation loss fused vs reference."""
    from bmoe_runtime.train.trainer import train
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("fused", "reference"):
            butterfly.use_fused(mode == "fused")
            try:
                t0 = time.perf_counter()
                m = train(f"{data_dir}/wikitext-2", f"{tmp}/{mode}.pt", preset="paper", tokenizer="byte", device="cuda",
                          train_overrides={"steps": steps, "eval_every": steps, "warmup": steps // 10, "seed": 0},
                          log=lambda s: print(s, flush=True))
                out[mode] = {"valid_loss": m["valid"]["loss"], "seconds": time.perf_counter() - t0}
            finally:
                butterfly.use_fused(True)
    out["rel_diff"] = abs(out["fused"]["valid_loss"] - out["reference"]["valid_loss"]) / out["reference"]["valid_loss"]
    out["steps"] = steps
    return out


def table(results: list[dict]) -> str:
    dense = {r["mode"]: r for r in results if r["shape"] == "dense-d512-N8"}
    eager = {r["shape"]: r for r in results if r["mode"] == "fused"}
    lines = ["| shape | step | tokens/s | step ms (median [q1, q3]) | peak GiB allocated (reserved) "
             "| vs dense N=8 (time / memory) | tokens/s vs fused |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = dense.get("fused" if r["mode"] == "reference" else r["mode"]) or dense.get("fused")
        same_shape = next(s for s in SHAPES if s.name == r["shape"]).d_model == SHAPES[0].d_model
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}× / {r['peak_gib'] / base['peak_gib']:.2f}×" \
            if base and same_shape else "–"
        reserved = f" ({r['peak_reserved_gib']:.2f})" if "peak_reserved_gib" in r else ""
        gain = f"{r['tokens_per_s'] / eager[r['shape']]['tokens_per_s']:.2f}×" if r["shape"] in eager else "–"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['tokens_per_s'] / 1e3:,.0f} k | {r['step_ms']:.2f} "
                     f"[{r['step_ms_q1']:.2f}, {r['step_ms_q3']:.2f}] | {r['peak_gib']:.2f}{reserved} | {ratio} | {gain} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="shape names (default: all)")
    ap.add_argument("--modes", nargs="*", default=["fused", "reference"], choices=MODES)
    ap.add_argument("--time-budget", type=float, metavar="S", help="start no measurement after S seconds")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", nargs="*", default=[], help="shape names to profile (fused step)")
    ap.add_argument("--valid-check", metavar="DATA_DIR", help="directory holding wikitext-2/")
    ap.add_argument("--valid-steps", type=int, default=300)
    ap.add_argument("--out", default="runs/train_throughput.json")
    ap.add_argument("--update-docs", action="store_true", help=f"rewrite the results block of {DOCS.name}")
    ap.add_argument("--docs-block", default="", metavar="NAME",
                    help="with --update-docs: the block marked train_throughput:NAME (default: the main table)")
    ap.add_argument("--from", dest="from_files", nargs="+", metavar="RESULTS_JSON",
                    help="measure nothing: render (and with --update-docs, write) earlier results files as one table")
    args = ap.parse_args()
    if args.from_files:
        saved = [json.loads(Path(f).read_text()) for f in args.from_files]
        md = table([r for s in saved for r in s["results"]])
        print(saved[0]["setup"], md, sep="\n\n")
        if args.update_docs:
            update_docs(saved[0]["setup"], md, args.docs_block)
        return
    if not torch.cuda.is_available():
        sys.exit("train_throughput.py needs a CUDA device")
    shapes = [s for s in SHAPES if not args.only or s.name in args.only]
    if args.only and len(shapes) != len(args.only):
        sys.exit(f"unknown shape in --only; known: {', '.join(s.name for s in SHAPES)}")
    header = (f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}, bf16 autocast, vocab {VOCAB}, "
              f"batch {BATCH} × seq {SEQ}, top-2, paper expert form; medians of {args.steps} steps after "
              f"{args.warmup} warm-up steps")
    print(header, flush=True)
    results, failed, skipped = [], [], []
    out = {"setup": header, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results,
           "failed": failed, "skipped": skipped}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for mode in args.modes:
        for shape in shapes:
            if mode == "reference" and shape.variant == "dense":
                continue  # no butterfly: the reference path is the same step
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                skipped.append({"shape": shape.name, "mode": mode})
                print(f"{shape.name:22s} {mode:16s} skipped: time budget of {args.time_budget:.0f} s spent", flush=True)
                continue
            try:
                r = measure(shape, mode, args.warmup, args.steps)
            except Exception as e:  # a mode that cannot run here (e.g. graph capture) is reported, not fatal
                failed.append({"shape": shape.name, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{shape.name:22s} {mode:16s} failed: {failed[-1]['error']}", flush=True)
                continue
            results.append(r)
            print(f"{r['shape']:22s} {mode:16s} {r['tokens_per_s'] / 1e3:8.1f} k tok/s  {r['step_ms']:7.2f} ms "
                  f"[{r['step_ms_q1']:.2f}, {r['step_ms_q3']:.2f}]  peak {r['peak_gib']:.2f} ({r['peak_reserved_gib']:.2f} reserved) GiB  "
                  f"(build + warm-up {r['warmup_s']:.1f} s)", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))  # after each: a later one may fail or time out
    md = table(results)
    print(md)
    Path(args.out).write_text(json.dumps(out, indent=1))
    for name in args.profile:
        out.setdefault("profiles", {})[name] = prof = profile(next(s for s in SHAPES if s.name == name))
        print(f"profile of {name} (fused step, 5 steps):\n{prof}", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.valid_check:
        out["valid_check"] = valid_check(args.valid_check, args.valid_steps)
        print(json.dumps(out["valid_check"]), flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    if args.update_docs:
        update_docs(header, md, args.docs_block)


def update_docs(header: str, md: str, block: str = "") -> None:
    text = DOCS.read_text()
    begin, end = markers(block)
    if begin not in text or end not in text:
        sys.exit(f"{DOCS} lacks the {begin} … {end} markers")
    head, rest = text.split(begin, 1)
    DOCS.write_text(f"{head}{begin}\n{header}\n\n{md}\n{end}{rest.split(end, 1)[1]}")
    print(f"updated {DOCS}")


if __name__ == "__main__":
    main()
