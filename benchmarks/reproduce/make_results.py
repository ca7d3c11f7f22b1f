"""Regenerate docs/results.md's tables and docs/ppl_vs_memory.png from benchmarks/reproduce/results.json.

    python benchmarks/reproduce/make_results.py                 # tables to stdout, plot to runs/bench/results/
    python benchmarks/reproduce/make_results.py --update-docs   # also rewrites docs/results.md's generated block
                                                                 # (between its markers) and docs/ppl_vs_memory.png

Expert memory is bmoe_runtime.nn.memory.model_memory's count (1.58-bit trits + fp32 row scales,
fp16 angles, dense experts fp32), summed over the 4 layers; the column for sizes measured from
exported files comes from docs/memory.json (benchmarks/memory_files.py: one exported layer at
d 512, d_ff 2048, 2-bit trits + fp16 angles, bytes read from the files) times the layer count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks/reproduce/results.json"
DOC = ROOT / "docs/results.md"
PNG = ROOT / "docs/ppl_vs_memory.png"
BEGIN, END = "<!-- tables:begin (make_results.py) -->", "<!-- tables:end -->"
MIB = 2**20
LABEL = {"dense": "dense MoE (fp32)", "ternary": "ternary MoE (1.58-bit)", "static": "static butterfly (frozen)",
         "butterfly": "ButterflyMoE"}


MEASURED = ROOT / "docs/memory.json"


def measured_from_files(c: dict) -> str:
    """Expert bytes of the exported files (bmoe-export defaults: 2-bit trits, fp16 angles), all layers."""
    if c["variant"] in ("butterfly", "static"):
        per_layer = {r["N"]: r["expert_bytes"] for r in json.loads(MEASURED.read_text())
                     if r["packing"] == "2bit" and r["angles"] == "fp16"}
        if c["d_model"] != 512 or c["d_ff"] != 2048 or c["n_experts"] not in per_layer:
            return "—"
        return f"{c['n_layers'] * per_layer[c['n_experts']] / MIB:.3f} MiB"
    # dense and ternary experts export as one fp32 table per layer (no packed per-expert ternary op in v1)
    fp32 = c["n_layers"] * c["n_experts"] * c["d_ff"] * c["d_model"] * 4
    return f"{fp32 / MIB:.3f} MiB{' (fp32 table)' if c['variant'] == 'ternary' else ''}"


def _wt_rows(runs: dict) -> list[tuple[str, dict]]:
    rows = [(k, v) for k, v in runs.items() if k.startswith("wt_")]
    order = {"dense": 0, "ternary": 1, "static": 2, "butterfly": 3}
    return sorted(rows, key=lambda kv: (kv[1]["config"]["n_experts"] == 1, kv[1]["config"]["n_experts"],
                                        order[kv[1]["config"]["variant"]], kv[1]["config"]["d_ff"]))


def _name(v: dict) -> str:
    c = v["config"]
    if c["n_experts"] == 1:
        return f"dense FFN, no MoE, d_ff {c['d_ff']}"
    return f"{LABEL[c['variant']]}, N={c['n_experts']}"


def tables(data: dict) -> str:
    runs = data["runs"]
    dense_at = {v["config"]["n_experts"]: v["memory_bytes"]["expert"] for v in runs.values()
                if v["config"]["variant"] == "dense" and v["config"]["n_experts"] > 1 and v["metrics"]["corpus"] == "wikitext-2"}
    out = ["### WikiText-2 (BPE 8192, preset `paper`, 1000 steps × 32 × 128 = 4.10M training tokens each)", "",
           "| run | valid ppl | test ppl | valid word ppl | test word ppl | expert memory (model_memory) | measured from files | "
           "compression vs dense, same N | train tokens | train s | call |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    call_of = {n: c for c, names in data["calls"].items() for n in names}
    for k, v in _wt_rows(runs):
        m, c, eb = v["metrics"], v["config"], v["memory_bytes"]["expert"]
        # dense fp32 experts at the same N (the dense run's own count where it ran, else counted)
        dense = dense_at.get(c["n_experts"], c["n_layers"] * c["n_experts"] * c["d_ff"] * c["d_model"] * 4)
        ratio = dense / eb if c["n_experts"] > 1 else None
        out.append(f"| {_name(v)} | {m['valid']['ppl']:.2f} | {m['test']['ppl']:.2f} | {m['valid']['word_ppl']:.1f} | "
                   f"{m['test']['word_ppl']:.1f} | {eb / MIB:.3f} MiB | {measured_from_files(c)} | "
                   f"{'—' if ratio is None else f'{ratio:.1f}×'} | {m['train_tokens'] / 1e6:.2f}M | "
                   f"{m['train_seconds']:.0f} | {call_of.get(k, '?')} |")
    out += ["", "Expert memory: all 4 layers' expert banks (the `paper` form's shared fp32 output projection, "
            "4 × 4 MiB, is outside it for every MoE run). For the dense FFN rows it is the up matrix alone; "
            "their whole FFN (up + down, fp32) is twice that.", ""]

    out += ["### ButterflyMoE against the dense MoE at the same N", "",
            "| N | dense valid / test ppl | ButterflyMoE valid / test ppl | gap valid | gap test | expert memory dense → butterfly |",
            "|---|---|---|---|---|---|"]
    by = {(v["config"]["variant"], v["config"]["n_experts"]): v for k, v in runs.items() if k.startswith("wt_")}
    for n in sorted({n for (_, n) in by if n > 1}):
        b = by.get(("butterfly", n))
        d = by.get(("dense", n))
        if not b:
            continue
        if d:
            gv = b["metrics"]["valid"]["ppl"] / d["metrics"]["valid"]["ppl"] - 1
            gt = b["metrics"]["test"]["ppl"] / d["metrics"]["test"]["ppl"] - 1
            out.append(f"| {n} | {d['metrics']['valid']['ppl']:.2f} / {d['metrics']['test']['ppl']:.2f} | "
                       f"{b['metrics']['valid']['ppl']:.2f} / {b['metrics']['test']['ppl']:.2f} | {gv:+.1%} | {gt:+.1%} | "
                       f"{d['memory_bytes']['expert'] / MIB:.1f} MiB → {b['memory_bytes']['expert'] / MIB:.2f} MiB |")
        else:
            out.append(f"| {n} | not run (would be {4 * n * 2048 * 512 * 4 / MIB:.0f} MiB of fp32 experts) | "
                       f"{b['metrics']['valid']['ppl']:.2f} / {b['metrics']['test']['ppl']:.2f} | — | — | "
                       f"→ {b['memory_bytes']['expert'] / MIB:.2f} MiB |")
    out += ["", "### Static (frozen random) rotations against trained ones", "",
            "| N | static valid / test ppl | ButterflyMoE valid / test ppl | static worse by (test) |", "|---|---|---|---|"]
    for n in sorted({n for (_, n) in by if n > 1}):
        s, b = by.get(("static", n)), by.get(("butterfly", n))
        if s and b:
            out.append(f"| {n} | {s['metrics']['valid']['ppl']:.2f} / {s['metrics']['test']['ppl']:.2f} | "
                       f"{b['metrics']['valid']['ppl']:.2f} / {b['metrics']['test']['ppl']:.2f} | "
                       f"{s['metrics']['test']['ppl'] / b['metrics']['test']['ppl'] - 1:+.1%} |")

    out += ["", "### TinyShakespeare (bytes, preset `tiny`: d 128, 2 layers, d_ff 256, N=8, top-2)", "",
            "| run | steps | train tokens | valid loss (nats) | valid bpc | expert memory | train s | call |",
            "|---|---|---|---|---|---|---|---|"]
    for k in ("ts_dense_n8", "ts_butterfly_n8", "default_model"):
        if k not in runs:
            continue
        v = runs[k]
        m, c = v["metrics"], v["config"]
        name = _name(v) if k != "default_model" else (f"bundled default model: ButterflyMoE d {c['d_model']}, "
                                                      f"{c['n_layers']} layers, d_ff {c['d_ff']}, N={c['n_experts']}, seq 256")
        out.append(f"| {name} | {v['steps_done']} | {m['train_tokens'] / 1e6:.2f}M | {m['valid']['loss']:.4f} | "
                   f"{m['valid']['bpc']:.3f} | {v['memory_bytes']['expert'] / MIB:.3f} MiB | {m['train_seconds']:.0f} | "
                   f"{call_of.get(k, '?')} |")
    if "ts_dense_n8" in runs and "ts_butterfly_n8" in runs:
        d, b = runs["ts_dense_n8"]["metrics"]["valid"]["bpc"], runs["ts_butterfly_n8"]["metrics"]["valid"]["bpc"]
        out += ["", f"ButterflyMoE against dense at N=8 on TinyShakespeare: {b:.3f} vs {d:.3f} bpc ({b / d - 1:+.1%})."]

    out += ["", "### Validation perplexity along training (WikiText-2, full valid split)", "",
            "| run | " + " | ".join(f"step {h['step']}" for h in _wt_rows(runs)[0][1]["metrics"]["history"]) + " |",
            "|---|" + "---|" * len(_wt_rows(runs)[0][1]["metrics"]["history"])]
    for k, v in _wt_rows(runs):
        out.append(f"| {_name(v)} | " + " | ".join(f"{h['valid']['ppl']:.1f}" for h in v["metrics"]["history"]) + " |")
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    style = {"dense": ("s", "tab:red"), "ternary": ("^", "tab:orange"), "static": ("x", "tab:gray"),
             "butterfly": ("o", "tab:blue")}
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=130)
    seen = set()
    for k, v in _wt_rows(runs):
        c, m = v["config"], v["metrics"]
        x, y = v["memory_bytes"]["expert"] / MIB, m["test"]["ppl"]
        if c["n_experts"] == 1:
            mk, col, lab = "D", "tab:green", "dense FFN, no MoE"
        else:
            mk, col = style[c["variant"]]
            lab = LABEL[c["variant"]]
        ax.scatter(x, y, marker=mk, color=col, s=70, label=None if lab in seen else lab, zorder=3)
        seen.add(lab)
        txt = f"d_ff {c['d_ff']}" if c["n_experts"] == 1 else f"N={c['n_experts']}"
        ax.annotate(txt, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=col)
    for var in ("butterfly", "dense", "ternary", "static"):
        pts = sorted((v["memory_bytes"]["expert"] / MIB, v["metrics"]["test"]["ppl"]) for k, v in _wt_rows(runs)
                     if v["config"]["variant"] == var and v["config"]["n_experts"] > 1)
        if len(pts) > 1:
            ax.plot(*zip(*pts), color=style[var][1], alpha=0.4, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("expert memory, 4 layers (MiB, log scale; 1.58-bit trits, fp16 angles, fp32 dense)")
    ax.set_ylabel("WikiText-2 test perplexity (BPE 8192 tokens)")
    ax.set_title("WikiText-2, d 512, 4 layers, top-2, 4.1M training tokens each (lower left is better)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--update-docs", action="store_true",
                    help="rewrite the generated tables in docs/results.md and docs/ppl_vs_memory.png")
    a = ap.parse_args()
    data = json.loads(Path(a.results).read_text())
    md = tables(data)
    print(md)
    if not a.update_docs:
        out = ROOT / "runs" / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        plot(data, out / PNG.name)
        return
    plot(data, PNG)
    doc = DOC.read_text() if DOC.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{md}\n{END}{tail}")
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
