"""Expert memory of one paper-form ButterflyMoE layer (d=512, d_ff=2048), measured on exported files.

For each N the layer is exported with bmoe-export's writer; expert bytes are the bytes of
the prototype (packed trits + row scales, in weights.bin) and of angles.bin, read from the
files on disk. The baseline is the dense fp32 MoE the paper compares with: N × d_ff × d × 4.
Writes memory.json, memory_table.md (and memory_scaling.png with --plot) to runs/bench/memory/
(or --out); --update-docs also refreshes docs/memory.json, docs/memory_scaling.png and the
generated table in docs/memory.md (the text around it is kept).

    python benchmarks/memory_files.py [--plot] [--out DIR] [--update-docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bmoe_runtime import ButterflyMoE  # noqa: E402
from bmoe_runtime.nn.memory import paper_expert_ratio  # noqa: E402
from exporters import ExportOptions, export_module  # noqa: E402
from benchmarks.results import DOCS, replace_block, results_dir  # noqa: E402

D, D_FF = 512, 2048
PAPER_MB = {2: 0.25, 4: 0.30, 8: 0.40, 16: 0.61, 32: 1.03, 64: 1.85, 128: 3.51, 256: 6.82}
CONFIGS = [("2bit", "fp16"), ("base3", "fp16"), ("base3", "int8")]


class OneLayer(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.moe = ButterflyMoE(D, D_FF, n_experts=n, top_k=2, expert_form="paper")

    def forward(self, x):
        return self.moe(x)


def measure(n: int, packing: str, angles: str, root: Path) -> dict:
    torch.manual_seed(0)
    out = export_module(OneLayer(n).eval(), (torch.randn(3, D),), root / f"n{n}_{packing}_{angles}", ["x"], ["y"],
                        dynamic_shapes={"x": {0: torch.export.Dim("tokens")}}, options=ExportOptions(packing, angles))
    manifest = json.loads((out / "manifest.json").read_text())
    proto = sum(t["bytes"] for t in manifest["tensors"].values() if t["kind"] == "prototypes")
    angle_file = (out / "angles.bin").stat().st_size  # measured on disk
    dense = n * D_FF * D * 4
    return {"N": n, "packing": packing, "angles": angles, "prototype_bytes": proto, "angle_file_bytes": angle_file,
            "expert_bytes": proto + angle_file, "dense_fp32_bytes": dense, "ratio": dense / (proto + angle_file),
            "files_bytes": sum(f["bytes"] for f in manifest["files"].values())}


def table(rows: list[dict]) -> str:
    by = {(r["N"], r["packing"], r["angles"]): r for r in rows}
    lines = [
        "| N | dense fp32 MiB | 2-bit + fp16 MiB | ratio | 1.6-bit + fp16 MiB | ratio | 1.6-bit + int8 MiB | ratio | paper's MB | paper's ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, mb in PAPER_MB.items():
        cells = [f"{by[(n, 'base3', 'fp16')]['dense_fp32_bytes'] / 2**20:.1f}"]
        for p, a in CONFIGS:
            r = by[(n, p, a)]
            cells += [f"{r['expert_bytes'] / 2**20:.3f}", f"**{r['ratio']:.1f}×**"]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {mb:.2f} | {paper_expert_ratio(n):.2f}× |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["N"], r["packing"], r["angles"]): r for r in rows}
    ns = list(PAPER_MB)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(ns, [PAPER_MB[n] for n in ns], "k--o", label="paper (reported)")
    for p, a in CONFIGS:
        ax.plot(ns, [by[(n, p, a)]["expert_bytes"] / 2**20 for n in ns], "-o", label=f"measured: {p} trits, {a} angles")
    ax.plot(ns, [n * D_FF * D * 4 / 2**20 for n in ns], ":", color="gray", label="dense fp32 experts")
    ax.set(xscale="log", yscale="log", xlabel="experts N", ylabel="expert memory (MiB)",
           title=f"One MoE layer, d={D}, d_ff={D_FF}")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--out", help="results directory (default runs/bench/memory)")
    ap.add_argument("--update-docs", action="store_true",
                    help="also refresh docs/memory.json, docs/memory_scaling.png and docs/memory.md's generated table")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in PAPER_MB:
            for packing, angles in CONFIGS:
                rows.append(measure(n, packing, angles, Path(tmp)))
                r = rows[-1]
                print(f"N={n:3d} {packing:5s} {angles}: {r['expert_bytes'] / 2**20:7.3f} MiB, {r['ratio']:6.1f}x", flush=True)
    text = table(rows)
    print(text)
    targets = [results_dir("memory", args.out)] + ([DOCS] if args.update_docs else [])
    for d in targets:
        (d / "memory.json").write_text(json.dumps(rows, indent=1) + "\n")
        if args.plot:
            plot(rows, d / "memory_scaling.png")
    (targets[0] / "memory_table.md").write_text(text + "\n")
    print(f"wrote {targets[0]}")
    if args.update_docs:
        replace_block(DOCS / "memory.md", "memory-table", text)
        print(f"updated {DOCS / 'memory.md'}, {DOCS / 'memory.json'}" + (", docs/memory_scaling.png" if args.plot else ""))


if __name__ == "__main__":
    main()
