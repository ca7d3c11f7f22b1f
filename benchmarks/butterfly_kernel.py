"""Fused (Triton) ButterflyRotate vs the PyTorch reference on CUDA: max errors and speed.

Errors: output y, gradient to x and gradient to the angles of both paths against the
reference in float64 on the same inputs (x float32 or bfloat16, 64 experts, 8192 rows with one
expert taking a quarter of them), both directions. Speed: forward + backward of one call,
median of CUDA-event timings, fused vs reference in the same run.

    python benchmarks/butterfly_kernel.py [--out runs/butterfly_kernel.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bmoe_runtime.nn import butterfly  # noqa: E402
from bmoe_runtime.nn.butterfly import ButterflyRotation  # noqa: E402

DIMS = (48, 512, 768, 2048, 4096)
ROWS, EXPERTS = 8192, 64


def bank(d: int, dtype=torch.float32) -> ButterflyRotation:
    g = torch.Generator().manual_seed(d)
    rot = ButterflyRotation(d, EXPERTS, generator=g)
    with torch.no_grad():
        rot.angles.uniform_(-math.pi, math.pi, generator=g)
    return rot.cuda().to(dtype)


def call(rot, x, idx, gy, transpose: bool, fused: bool):
    butterfly.use_fused(fused)
    x = x.detach().clone().requires_grad_()
    rot.zero_grad(set_to_none=True)
    y = rot(x, idx, transpose=transpose)
    y.backward(gy.to(y.dtype))
    butterfly.use_fused(True)
    return y.detach(), x.grad, rot.angles.grad


def inputs(d: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(ROWS, d, device="cuda", generator=g).to(dtype)
    idx = torch.randint(0, EXPERTS, (ROWS,), device="cuda", generator=g)
    idx[: ROWS // 4] = 5  # repeated indices: one expert takes a quarter of the rows
    return x, idx, torch.randn(ROWS, d, device="cuda", generator=g)


def max_err(a: torch.Tensor, gold: torch.Tensor) -> float:
    return (a.double() - gold).abs().max().item()


def errors(d: int, dtype, transpose: bool) -> dict:
    x, idx, gy = inputs(d, dtype)
    gold = call(bank(d, torch.float64), x.double(), idx, gy.double(), transpose, fused=False)
    row = {"d": d, "dtype": str(dtype).removeprefix("torch."), "transpose": transpose,
           "gold_max": [g.abs().max().item() for g in gold]}
    for name, fused in (("fused", True), ("reference", False)):
        row[name] = [max_err(a, g) for a, g in zip(call(bank(d), x, idx, gy, transpose, fused), gold)]
    return row


def time_ms(fn, reps: int = 30) -> tuple[float, float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[0], q[2]


def speed(d: int) -> dict:
    x, idx, gy = inputs(d, torch.float32)
    rot = bank(d)
    row = {"d": d}
    for name, fused in (("fused", True), ("reference", False)):
        row[name] = time_ms(lambda: call(rot, x, idx, gy, False, fused))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/butterfly_kernel.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("butterfly_kernel.py needs a CUDA device")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "experts": EXPERTS,
              "errors": [], "speed": []}
    print("| d | x dtype | transpose | fused: y / dx / dθ | reference: y / dx / dθ | max |gold| y / dx / dθ |")
    print("|---|---|---|---|---|---|")
    for d in DIMS:
        for dtype in (torch.float32, torch.bfloat16):
            for transpose in (False, True):
                r = errors(d, dtype, transpose)
                result["errors"].append(r)
                fmt = lambda v: " / ".join(f"{e:.1e}" for e in v)  # noqa: E731
                print(f"| {d} | {r['dtype']} | {int(transpose)} | {fmt(r['fused'])} | {fmt(r['reference'])} | "
                      f"{fmt(r['gold_max'])} |", flush=True)
    print(f"\nforward+backward of {ROWS} rows, {EXPERTS} experts, fp32, ms (median [q1, q3])")
    for d in DIMS:
        r = speed(d)
        result["speed"].append(r)
        print(f"d={d}: fused {r['fused'][0]:.3f} [{r['fused'][1]:.3f}, {r['fused'][2]:.3f}]  "
              f"reference {r['reference'][0]:.3f}  ratio {r['reference'][0] / r['fused'][0]:.1f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
