"""One whole MoE layer at decode (batch 1): ButterflyMoE (ai.bmoe ops) vs dense fp32 experts (standard ops).

Both layers: paper form, d=512, d_ff=2048, 64 experts, top-2, exported by bmoe-export's writer
and run by ONNX Runtime (the butterfly one with the C++ op library). Medians over many runs,
1 and 2 intra-op threads, ratios from the same run.

Writes bench_layer.json and bench_layer.md to runs/bench/layer/ (or --out); --update-docs also
refreshes docs/bench_layer.json and the generated table in docs/benchmarks.md.

    python benchmarks/bench_layer.py [--reps 300] [--out DIR] [--update-docs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import DOCS, cpu_model, replace_block, results_dir  # noqa: E402
from bmoe_runtime import ButterflyMoE  # noqa: E402
from bmoe_runtime.backends import ort_ops  # noqa: E402
from exporters import ExportOptions, export_module  # noqa: E402

D, D_FF, N, K = 512, 2048, 64, 2


def export(variant: str, root: Path) -> tuple[Path, int]:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(ButterflyMoE(D, D_FF, N, K, variant=variant)).eval()
    out = export_module(layer, (torch.randn(3, D),), root / variant, ["x"], ["y"],
                        dynamic_shapes=({0: torch.export.Dim("tokens")},), options=ExportOptions("2bit", "fp16"))
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = manifest["bytes_by_kind"]
    return out, kinds.get("prototypes", 0) + kinds.get("angles", 0) + kinds.get("experts", 0)


def time_ms(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> dict[str, float]:
    """Median and quartiles (ms) of `reps` runs after 20 warm-ups."""
    for _ in range(20):
        sess.run(None, {"x": x})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append((time.perf_counter() - t) * 1e3)
    q1, med, q3 = statistics.quantiles(times, n=4)
    return {"median": med, "q1": q1, "q3": q3}


def markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu']}, onnxruntime {result['onnxruntime']}; median [quartiles] of "
             f"{result['reps']} runs after 20 warm-ups.", "",
             "| threads | dense fp32 experts (ms) | ButterflyMoE (ms) | speed-up (medians) |", "|---|---|---|---|"]
    for r in result["rows"]:
        cell = {v: f"{r[v]['median']:.3f} [{r[v]['q1']:.3f}–{r[v]['q3']:.3f}]" for v in ("dense", "butterfly")}
        lines.append(f"| {r['threads']} | {cell['dense']} | {cell['butterfly']} | **{r['speedup']:.1f}×** |")
    mem = result["expert_bytes"]
    lines += ["", f"Expert memory in the exported files: dense {mem['dense'] / 2**20:.1f} MiB, ButterflyMoE "
              f"{mem['butterfly'] / 2**20:.2f} MiB — **{result['memory_ratio']:.0f}× less**."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", help="results directory (default runs/bench/layer)")
    ap.add_argument("--update-docs", action="store_true",
                    help="also refresh docs/bench_layer.json and the generated table in docs/benchmarks.md")
    args = ap.parse_args()
    if not ort_ops.available():
        sys.exit("libbmoe_ops.so is not built")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, D)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {v: export(v, Path(tmp)) for v in ("butterfly", "dense")}
        for threads in (1, 2):
            ms = {}
            for variant, (path, _) in models.items():
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
                ort_ops.register(opts)
                sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                ms[variant] = time_ms(sess, x, args.reps)
                print(f"{threads} thread(s) {variant:9s}: {ms[variant]['median']:.3f} ms", flush=True)
            rows.append({"threads": threads, **ms, "speedup": ms["dense"]["median"] / ms["butterfly"]["median"]})
    mem = {v: b for v, (_, b) in models.items()}
    result = {"cpu": cpu_model(), "onnxruntime": ort.__version__, "reps": args.reps, "rows": rows,
              "expert_bytes": mem, "memory_ratio": mem["dense"] / mem["butterfly"]}
    text = markdown(result)
    print(text)
    out = results_dir("layer", args.out)
    (out / "bench_layer.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench_layer.md").write_text(text + "\n")
    print(f"wrote {out}")
    if args.update_docs:
        (DOCS / "bench_layer.json").write_text(json.dumps(result, indent=1) + "\n")
        replace_block(DOCS / "benchmarks.md", "bench-layer", text)
        print(f"updated {DOCS / 'bench_layer.json'} and {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
