"""Two libraries over several runs of benchmarks/bench_decode_bandwidth.py (--json), on a noisy shared host.

    python benchmarks/native/compare_runs.py before=old_1.json,old_2.json after=new_1.json,new_2.json [--out t.md]

Per shape, thread count and kernel (exact, act_quant): each run's median GB/s (weights from DRAM) and its % of
the streaming read measured in that run (paired rounds: the median of the rounds' ratios), then across runs the
median and range, and after / before of the medians; last, the medians with the weights in the LLC (the kernel's
compute speed). fp32 MatMul, where a run has it, is
listed as the same-run anchor; columns run with another library (`ternary/old`, bench_decode_bandwidth.py --lib)
are rows of their own. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KERNELS = {"ternary": "exact", "ternary_aq": "act_quant", "fp32": "fp32 MatMul"}


def run_cells(path: Path) -> dict[tuple[str, int, str], tuple[float, float, float]]:
    """(shape, threads, impl) → (median GB/s, median over the run's paired rounds of GB/s / that round's streaming
    read, median GB/s with the weights in the LLC). Runs from before the paired rounds (one read per thread count,
    `stream_read_gbs` at the top level) divide the median GB/s by that read's median."""
    d = json.loads(path.read_text())
    read = {int(t): statistics.median(v) for t, v in d.get("stream_read_gbs", {}).items()}
    cells = {}
    for c in d["decode"]:
        gbs = [c["bytes"] / s / 1e9 for s in c["seconds_per_product"]]
        frac = statistics.median(g / r for g, r in zip(gbs, c["stream_read_gbs"])) if "stream_read_gbs" in c \
            else statistics.median(gbs) / read[c["threads"]]
        llc = c["bytes"] / statistics.median(c["seconds_per_product_in_llc"]) / 1e9
        cells[f"{c['k']}×{c['n']}", c["threads"], c["impl"]] = (statistics.median(gbs), frac, llc)
    return cells


def spread(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})" if xs else "–"


def table(groups: dict[str, list[Path]]) -> str:
    runs = {label: [run_cells(p) for p in paths] for label, paths in groups.items()}
    labels = list(runs)
    order = list(KERNELS)
    base = {k[2]: k[2].split("/")[0] for rs in runs.values() for r in rs for k in r}  # ternary/old → ternary
    keys = sorted({k for rs in runs.values() for r in rs for k in r if base[k[2]] in KERNELS},
                  key=lambda k: (*(-int(v) for v in k[0].split("×")), k[1], order.index(base[k[2]]), k[2]))
    head = ["K×N", "threads", "kernel"] + [f"{lb} GB/s (runs: {len(runs[lb])})" for lb in labels] + \
           [f"{lb} % of read" for lb in labels]
    if len(labels) == 2:
        head.append(f"{labels[1]} / {labels[0]}")
    head += [f"{lb} in LLC GB/s" for lb in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, threads, impl in keys:
        vals = {lb: [r[shape, threads, impl] for r in rs if (shape, threads, impl) in r] for lb, rs in runs.items()}
        row = [shape, str(threads), KERNELS[base[impl]] + impl[len(base[impl]):]]
        row += [spread([v[0] for v in vals[lb]], ".1f") for lb in labels]
        row += [spread([100 * v[1] for v in vals[lb]], ".0f") for lb in labels]
        if len(labels) == 2:
            a, b = ([v[0] for v in vals[lb]] for lb in labels)
            row.append(f"{statistics.median(b) / statistics.median(a):.2f}×" if a and b else "–")
        row += [f"{statistics.median([v[2] for v in vals[lb]]):.1f}" if vals[lb] else "–" for lb in labels]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="label=run1.json,run2.json,...")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    groups = {}
    for g in a.groups:
        label, _, files = g.partition("=")
        if not files:
            ap.error(f"expected label=file.json[,file.json...], got {g!r}")
        groups[label] = [Path(f) for f in files.split(",")]
    text = table(groups)
    if a.out:
        a.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
