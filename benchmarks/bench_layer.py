"""One whole MoE layer at decode (batch 1): ButterflyMoE (ai.bmoe ops) vs dense fp32 experts (standard ops).

Both layers: paper form, d=512, d_ff=2048, 64 experts, top-2, exported by bmoe-export's writer
and run by ONNX Runtime (the butterfly one with the C++ op library). Medians over many runs,
1 and 2 intra-op threads, ratios from the same run.

    python benchmarks/bench_layer.py [--reps 300]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bmoe_runtime import ButterflyMoE, ort_ops  # noqa: E402
from exporters import ExportOptions, export_module  # noqa: E402

D, D_FF, N, K = 512, 2048, 64, 2


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def export(variant: str, root: Path) -> tuple[Path, int]:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(ButterflyMoE(D, D_FF, N, K, variant=variant)).eval()
    out = export_module(layer, (torch.randn(3, D),), root / variant, ["x"], ["y"],
                        dynamic_shapes=({0: torch.export.Dim("tokens")},), options=ExportOptions("2bit", "fp16"))
    manifest = json.loads((out / "manifest.json").read_text())
    kinds = manifest["bytes_by_kind"]
    return out, kinds.get("prototypes", 0) + kinds.get("angles", 0) + kinds.get("experts", 0)


def median_ms(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    for _ in range(20):
        sess.run(None, {"x": x})
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
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
                ms[variant] = median_ms(sess, x, args.reps)
                print(f"{threads} thread(s) {variant:9s}: {ms[variant]:.3f} ms", flush=True)
            rows.append({"threads": threads, **{f"{v}_ms": t for v, t in ms.items()},
                         "speedup": ms["dense"] / ms["butterfly"]})
    mem = {v: b for v, (_, b) in models.items()}
    result = {"cpu": cpu_name(), "onnxruntime": ort.__version__, "rows": rows, "expert_bytes": mem,
              "memory_ratio": mem["dense"] / mem["butterfly"]}
    print(json.dumps(result, indent=1))
    out = Path(__file__).resolve().parents[1] / "docs" / "bench_layer.json"
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
