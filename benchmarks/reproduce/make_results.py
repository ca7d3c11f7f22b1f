"""Regenerate docs/results.md's tables and docs/ppl_vs_memory.png from benchmarks/reproduce/results.json.

    python benchmarks/reproduce/make_results.py                 # tables to stdout, plot to runs/bench/results/
    python benchmarks/reproduce/make_results.py --update-docs   # also rewrites docs/results.md's generated block
                                                                 # and docs/ppl_vs_memory.png

Runs are named CONFIG_sSEED; a config's numbers are over its complete seeds (a run stopped before its last step
has no final metrics). Mean ± sample standard deviation (n − 1), and every seed's value beside it.

A difference between two configs counts as larger than the seed spread when both hold:
  * the per-seed values do not overlap (every seed of one is below every seed of the other), and
  * |Δ mean| > 2 × the pooled standard deviation of the two configs' seeds.
With two or three seeds a side this is modest evidence (a standard deviation from so few values is itself very
uncertain); with one seed on a side only the other side's spread enters, and with one seed on each side no verdict
is given.

Expert memory is bmoe_runtime.nn.memory.model_memory's count (1.58-bit trits + fp32 row scales, fp16 angles,
dense experts fp32), summed over the layers; the column for sizes measured from exported files comes from
docs/memory.json (benchmarks/memory_files.py: one exported layer at d 512, d_ff 2048, 2-bit trits + fp16
angles, bytes read from the files) times the layer count.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.results import replace_block, results_dir  # noqa: E402

RESULTS = ROOT / "benchmarks/reproduce/results.json"
DOC = ROOT / "docs/results.md"
PNG = ROOT / "docs/ppl_vs_memory.png"
MEASURED = ROOT / "docs/memory.json"
TAG = "results-tables"
MIB = 2**20
OVERFIT = 0.01  # final valid ppl this far above the best evaluated one: the model overfits
LABEL = {"dense": "dense MoE (fp32)", "ternary": "ternary MoE (1.58-bit)", "static": "static butterfly (frozen)",
         "butterfly": "ButterflyMoE"}
ORDER = {"dense": 0, "ternary": 1, "static": 2, "butterfly": 3}
RUN_NAME = re.compile(r"^(?P<config>.+)_s(?P<seed>\d+)$")

Run = dict
Seeds = dict[int, Run]


@dataclass(frozen=True)
class Stat:
    """One metric of one config: its value per seed (in seed order)."""
    seeds: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else " (1 seed)")

    def per_seed(self, digits: int = 2) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in self.values)


def group(runs: dict[str, Run]) -> dict[str, Seeds]:
    """{config: {seed: run}}; names without a _sN seed (the bundled-model candidates) are left out."""
    out: dict[str, Seeds] = {}
    for name, run in runs.items():
        if m := RUN_NAME.match(name):
            out.setdefault(m["config"], {})[int(m["seed"])] = run
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def complete(seeds: Seeds) -> Seeds:
    return {s: r for s, r in seeds.items() if r["complete"]}


def stat(seeds: Seeds, value: Callable[[Run], float]) -> Stat:
    done = complete(seeds)
    return Stat(tuple(done), tuple(value(r) for r in done.values()))


def final_test_ppl(run: Run) -> float:
    return run["metrics"]["test"]["ppl"]


def final_valid_ppl(run: Run) -> float:
    return run["metrics"]["valid"]["ppl"]


def bits_per_byte(entry: dict) -> float:
    """Byte-tokenized runs: nats per token / ln 2 (their evaluations along training record the loss only)."""
    return entry["loss"] / math.log(2)


def best_valid(run: Run) -> tuple[float, int]:
    """Lowest valid ppl over the run's evaluations (every eval_every steps and the end) and its step."""
    return min((h["valid"]["ppl"], h["step"]) for h in run["metrics"]["history"])


def exceeds_spread(a: Stat, b: Stat) -> bool | None:
    """The module docstring's rule; None where both sides have one seed (no spread to compare with)."""
    if a.n + b.n < 3:
        return None
    ss = sum((v - s.mean) ** 2 for s in (a, b) for v in s.values)
    pooled = math.sqrt(ss / (a.n + b.n - 2))
    apart = max(a.values) < min(b.values) or max(b.values) < min(a.values)
    return apart and abs(a.mean - b.mean) > 2 * pooled


def verdict(a: Stat, b: Stat) -> str:
    v = exceeds_spread(a, b)
    seeds = f"n={a.n} vs {b.n}"
    return f"— ({seeds})" if v is None else f"{'**yes**' if v else 'no'} ({seeds})"


def config_of(seeds: Seeds) -> dict:
    return next(r["config"] for r in seeds.values() if "config" in r)


def name(cfg: dict) -> str:
    if cfg["n_experts"] == 1:
        return f"dense FFN, no MoE, d_ff {cfg['d_ff']}"
    extra = " + ternary attention & projection (QAT)" if cfg.get("ternary_attn") or cfg.get("ternary_proj") else ""
    return f"{LABEL[cfg['variant']]}{extra}, N={cfg['n_experts']}"


def wt_configs(groups: dict[str, Seeds]) -> list[str]:
    def key(k: str) -> tuple:
        c = config_of(groups[k])
        return (c["n_experts"] == 1, bool(c.get("ternary_attn")), c["n_experts"], ORDER[c["variant"]], c["d_ff"])
    return sorted((k for k in groups if k.startswith("wt_")), key=key)


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


def step_mode(run: Run) -> str:
    # metrics.cuda_graphs is absent from runs trained before the option existed: those steps were eager
    return "CUDA graph" if run["metrics"].get("cuda_graphs") else "eager"


def device(data: dict, seeds: Seeds) -> str:
    """The GPU, then per group of seeds the calls ("SESSION.CALL") that trained them and their step mode."""
    gpus = {s["session"]: s["gpu"].splitlines()[0].split(",")[0].removeprefix("NVIDIA ") for s in data["sessions"]}
    by_calls: dict[tuple[str, str], list[str]] = {}
    for seed, r in complete(seeds).items():
        by_calls.setdefault(("+".join(r["calls"]), step_mode(r)), []).append(f"s{seed}")
    used = {gpus[int(c.split(".")[0])] for r in complete(seeds).values() for c in r["calls"]}
    return f"1 {'/'.join(sorted(used))} (shared); " + "; ".join(
        f"{', '.join(s)}: call{'s' if '+' in calls else ''} {calls}, {mode}" for (calls, mode), s in by_calls.items())


def pct(a: float, b: float) -> str:
    return f"{a / b - 1:+.1%}"


def main_table(data: dict, groups: dict[str, Seeds]) -> list[str]:
    dense_at = {config_of(g)["n_experts"]: next(iter(g.values()))["memory_bytes"]["expert"]
                for k, g in groups.items() if k.startswith("wt_dense_n")}
    out = ["| run | seeds done | test ppl | test ppl per seed | valid ppl | test word ppl | expert memory "
           "(model_memory) | measured from files | compression vs dense, same N | train tokens each | device |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in wt_configs(groups):
        seeds, c = groups[k], config_of(groups[k])
        done = complete(seeds)
        if not done:
            continue
        eb = next(iter(done.values()))["memory_bytes"]["expert"]
        dense = dense_at.get(c["n_experts"], c["n_layers"] * c["n_experts"] * c["d_ff"] * c["d_model"] * 4)
        ratio = f"{dense / eb:.1f}×" if c["n_experts"] > 1 else "—"
        tokens = {r["metrics"]["train_tokens"] for r in done.values()}
        test = stat(seeds, final_test_ppl)
        out.append(f"| {name(c)} | {', '.join(map(str, done))} of {', '.join(map(str, seeds))} | "
                   f"{test.text()} | {test.per_seed()} | "
                   f"{stat(seeds, final_valid_ppl).text()} | "
                   f"{stat(seeds, lambda r: r['metrics']['test']['word_ppl']).text(1)} | "
                   f"{eb / MIB:.3f} MiB | {measured_from_files(c)} | {ratio} | "
                   f"{'/'.join(f'{t / 1e6:.1f}M' for t in sorted(tokens))} | {device(data, seeds)} |")
    return out


def unfinished_table(groups: dict[str, Seeds]) -> list[str]:
    if all(r["complete"] for g in groups.values() for r in g.values()):
        return ["None: every seed of every run above reached its last step."]
    out = ["| run | seed | status | steps done | valid ppl at its last evaluation |", "|---|---|---|---|---|"]
    for k in wt_configs(groups) + sorted(k for k in groups if k.startswith("ts_")):
        for seed, r in groups[k].items():
            if r["complete"]:
                continue
            cfg = config_of(groups[k])
            hist = r.get("metrics", {}).get("history", [])
            last = f"{hist[-1]['valid']['ppl']:.2f} (step {hist[-1]['step']})" if len(hist) > 1 else "—"
            out.append(f"| {name(cfg)}{' (TinyShakespeare)' if k.startswith('ts_') else ''} | {seed} | "
                       f"{r['status']} | {r['steps_done']} | {last} |")
    return out


def pair_rows(groups: dict[str, Seeds], a: str, b: str, label: str) -> list[str]:
    """Rows comparing config b against config a: final test ppl and best valid ppl along training."""
    rows = []
    for metric, f in (("test ppl at the end", final_test_ppl),
                      ("best valid ppl along training", lambda r: best_valid(r)[0])):
        sa, sb = stat(groups[a], f), stat(groups[b], f)
        rows.append(f"| {label} | {metric} | {sa.text()} ({sa.per_seed()}) | {sb.text()} ({sb.per_seed()}) | "
                    f"{pct(sb.mean, sa.mean)} | {verdict(sa, sb)} |")
    return rows


def comparisons(groups: dict[str, Seeds]) -> list[str]:
    def have(k: str) -> bool:
        return k in groups and bool(complete(groups[k]))

    head = ["| N | metric | {a} | {b} | Δ mean ({b} vs {a}) | larger than the seed spread? |",
            "|---|---|---|---|---|---|"]
    out = ["### ButterflyMoE against the dense MoE at the same N", "",
           *(h.format(a="dense MoE", b="ButterflyMoE") for h in head)]
    for n in (8, 64, 256):
        if have(f"wt_dense_n{n}") and have(f"wt_butterfly_n{n}"):
            out += pair_rows(groups, f"wt_dense_n{n}", f"wt_butterfly_n{n}", str(n))
        elif have(f"wt_butterfly_n{n}"):
            out.append(f"| {n} | test ppl at the end | not run (would be {4 * n * 2048 * 512 * 4 / MIB:.0f} MiB of "
                       f"fp32 experts) | {stat(groups[f'wt_butterfly_n{n}'], final_test_ppl).text()} | — | — |")
    out += ["", "### Static (frozen random) rotations against trained ones", "",
            *(h.format(a="ButterflyMoE", b="static") for h in head)]
    for n in (8, 64):
        if have(f"wt_static_n{n}") and have(f"wt_butterfly_n{n}"):
            out += pair_rows(groups, f"wt_butterfly_n{n}", f"wt_static_n{n}", str(n))
    out += ["", "### Ternary MoE (N independent 1.58-bit experts)", "",
            "| N | metric | other | ternary MoE | Δ mean (ternary vs other) | larger than the seed spread? |",
            "|---|---|---|---|---|---|"]
    for n in (8, 64):
        if not have(f"wt_ternary_n{n}"):
            out.append(f"| {n} | — | — | not finished (see the runs that did not finish) | — | — |")
            continue
        for other in ("dense", "butterfly"):
            if have(f"wt_{other}_n{n}"):
                out += [r.replace(f"| {n} |", f"| {n} (vs {LABEL[other]}) |", 1)
                        for r in pair_rows(groups, f"wt_{other}_n{n}", f"wt_ternary_n{n}", str(n))]
    fnn = [f"wt_densefnn_ff{ff}" for ff in (106, 211) if have(f"wt_densefnn_ff{ff}")]
    if fnn:
        out += ["", "### Dense FFNs (no MoE) at ButterflyMoE N=8's expert memory", "",
                "| dense FFN vs ButterflyMoE | metric | ButterflyMoE | dense FFN | Δ mean (dense FFN vs "
                "ButterflyMoE) | larger than the seed spread? |", "|---|---|---|---|---|---|"]
        for k in fnn:
            for n in (8, 64):
                if have(f"wt_butterfly_n{n}"):
                    out += pair_rows(groups, f"wt_butterfly_n{n}", k, f"d_ff {config_of(groups[k])['d_ff']} vs N={n}")
    qat = "wt_butterfly_n64_ternary_attn_proj"
    if have(qat) and have("wt_butterfly_n64"):
        out += ["", "### The whole model compressed: ternary attention and shared projection (QAT), N=64", "",
                *(h.format(a="ButterflyMoE, fp32 attention", b="ternary attn + proj") for h in head),
                *pair_rows(groups, "wt_butterfly_n64", qat, "64")]
    return out


def training_table(groups: dict[str, Seeds], keys: list[str], unit: str = "ppl") -> list[str]:
    """Valid metric at every evaluation, mean over the seeds that reached it (their count in brackets where it is not
    every seed of the config); then best along training and the rise from it to the end, over complete seeds."""
    value = (lambda h: h["valid"]["ppl"]) if unit == "ppl" else (lambda h: bits_per_byte(h["valid"]))
    digits = 2 if unit == "ppl" else 3
    steps = sorted({h["step"] for k in keys for r in groups[k].values()
                    for h in r.get("metrics", {}).get("history", []) if h["step"] > 0})
    out = [f"| run | {' | '.join(f'step {s}' for s in steps)} | best (mean ± std) | at step | end vs best | "
           "overfits? |",
           "|---|" + "---|" * (len(steps) + 4)]
    for k in keys:
        seeds = groups[k]
        cells = []
        for s in steps:
            vals = [value(h) for r in seeds.values() for h in r.get("metrics", {}).get("history", []) if h["step"] == s]
            cells.append("—" if not vals else f"{statistics.fmean(vals):.{digits}f}"
                         + ("" if len(vals) == len(seeds) else f" ({len(vals)})"))
        done = complete(seeds)
        if done:
            best = [min((value(h), h["step"]) for h in r["metrics"]["history"]) for r in done.values()]
            b = Stat(tuple(done), tuple(v for v, _ in best))
            end = Stat(tuple(done), tuple(value(r["metrics"]["history"][-1]) for r in done.values()))
            rise = end.mean / b.mean - 1
            at = ", ".join(sorted({str(s) for _, s in best}))
            tail = [b.text(digits), at, f"{rise:+.1%}", f"yes, after step {at}" if rise > OVERFIT else "no"]
        else:
            tail = ["not finished", "", "", ""]
        out.append(f"| {name(config_of(seeds))} | {' | '.join(cells)} | {' | '.join(tail)} |")
    return out


def ts_table(data: dict, groups: dict[str, Seeds]) -> list[str]:
    keys = [k for k in ("ts_dense_n8", "ts_butterfly_n8") if k in groups]
    out = ["| run | seeds done | valid bpc | valid bpc per seed | valid loss (nats) | best valid bpc along training | "
           "expert memory | train tokens each | device |", "|---|---|---|---|---|---|---|---|---|"]
    bpc = {}
    for k in keys:
        seeds, c = groups[k], config_of(groups[k])
        done = complete(seeds)
        if not done:
            continue
        bpc[k] = stat(seeds, lambda r: bits_per_byte(r["metrics"]["valid"]))
        best = stat(seeds, lambda r: min(bits_per_byte(h["valid"]) for h in r["metrics"]["history"]))
        out.append(f"| {name(c)} | {', '.join(map(str, done))} of {', '.join(map(str, seeds))} | {bpc[k].text(3)} | "
                   f"{bpc[k].per_seed(3)} | {stat(seeds, lambda r: r['metrics']['valid']['loss']).text(4)} | "
                   f"{best.text(3)} | {next(iter(done.values()))['memory_bytes']['expert'] / MIB:.3f} MiB | "
                   f"{next(iter(done.values()))['metrics']['train_tokens'] / 1e6:.2f}M | {device(data, seeds)} |")
    if len(bpc) == 2:
        d, b = bpc["ts_dense_n8"], bpc["ts_butterfly_n8"]
        out += ["", f"ButterflyMoE against dense at N=8 on TinyShakespeare (valid bpc at the end): {b.text(3)} vs "
                f"{d.text(3)} ({pct(b.mean, d.mean)}); larger than the seed spread: {verdict(d, b)}."]
    return out


def tables(data: dict) -> str:
    groups = group(data["runs"])
    wt = wt_configs(groups)
    tokens = {r["metrics"]["train_tokens"] for k in wt for r in complete(groups[k]).values()}
    steps = {r["metrics"]["train_config"]["steps"] for k in wt for r in complete(groups[k]).values()}
    out = [f"### WikiText-2 (BPE 8192, preset `paper`, {'/'.join(map(str, sorted(steps)))} steps × 32 × 128 = "
           f"{'/'.join(f'{t / 1e6:.1f}M' for t in sorted(tokens))} training tokens each; complete seeds only)", "",
           *main_table(data, groups), "",
           "Mean ± sample standard deviation over the complete seeds; *test ppl per seed* in seed order. Expert "
           "memory: all 4 layers' expert banks (the `paper` form's shared fp32 output projection, 4 × 4 MiB, is "
           "outside it for every MoE run). For the ternary attention & projection row the expert memory is its "
           "twin's; model_memory counts its attention and projection as fp32 (32.06 MiB) although they are trained "
           "ternary (their exported sizes: docs/memory.md).", "",
           *comparisons(groups), "",
           f"Rule for *larger than the seed spread*: the per-seed values do not overlap **and** |Δ mean| > 2 × the "
           f"pooled standard deviation. With n = 2 or 3 a side that is modest evidence (a standard deviation from "
           f"so few seeds is itself uncertain); with one seed on a side only the other side's spread counts; "
           f"*best valid ppl along training* is the lowest of the evaluations every 1000 steps and at the end, "
           f"chosen on the validation split itself (an early-stopping number: optimistic, and no test ppl exists "
           f"for it).", "",
           "### Validation perplexity along training (WikiText-2, full valid split)", "",
           *training_table(groups, wt), "",
           "Each step's cell: mean over the seeds that reached that evaluation (their number in brackets when some "
           "seeds stopped earlier; those are not in the other tables). *Best*, *end vs best*: complete seeds only; "
           f"*overfits*: the valid ppl at the end is more than {OVERFIT:.0%} above the best evaluation.", "",
           "### TinyShakespeare (bytes, preset `tiny`: d 128, 2 layers, d_ff 256, N=8, top-2, 2500 steps)", "",
           *ts_table(data, groups), "",
           "Valid bpc along training (mean over seeds; TinyShakespeare has no test split):", "",
           *training_table(groups, [k for k in ("ts_dense_n8", "ts_butterfly_n8") if k in groups], unit="bpc"), "",
           "### Runs that did not finish", "",
           *unfinished_table(groups)]
    return "\n".join(out)


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(data["runs"])
    style = {"dense": ("s", "tab:red"), "ternary": ("^", "tab:orange"), "static": ("x", "tab:gray"),
             "butterfly": ("o", "tab:blue"), "qat": ("P", "tab:purple"), "fnn": ("D", "tab:green")}
    names = {**LABEL, "qat": "ButterflyMoE + ternary attn & proj (QAT)",
             "fnn": "dense FFN, no MoE (its up matrix counted)"}
    metrics = (("test ppl at the end (6000 steps)", "test perplexity", final_test_ppl),
               ("best valid ppl along training (evaluated every 1000 steps)", "best valid perplexity",
                lambda r: best_valid(r)[0]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=130)
    for ax, (title, ylabel, f) in zip(axes, metrics):
        lines: dict[str, list[tuple[float, float]]] = {}
        for k in wt_configs(groups):
            seeds, c = groups[k], config_of(groups[k])
            done = complete(seeds)
            if not done:
                continue
            kind = "fnn" if c["n_experts"] == 1 else "qat" if c.get("ternary_attn") else c["variant"]
            mk, col = style[kind]
            x = next(iter(done.values()))["memory_bytes"]["expert"] / MIB * (1.2 if kind == "qat" else 1)
            s = stat(seeds, f)
            ax.scatter([x] * s.n, s.values, marker=mk, color=col, s=22, alpha=0.3, zorder=2)
            label = None if kind in lines else names[kind]
            ax.errorbar(x, s.mean, yerr=s.std or 0, fmt=mk, color=col, ms=8, capsize=4, zorder=3, label=label)
            text = f"d_ff {c['d_ff']}" if kind == "fnn" else f"N={c['n_experts']}"
            ax.annotate(text + (" (1 seed)" if s.n == 1 else ""), (x, s.mean), textcoords="offset points",
                        xytext=(7, -12 if kind in ("butterfly", "qat", "fnn") else 4), fontsize=8, color=col)
            lines.setdefault(kind, []).append((x, s.mean))
        for kind, pts in lines.items():
            if len(pts) > 1:
                ax.plot(*zip(*sorted(pts)), color=style[kind][1], alpha=0.5, lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("expert memory, 4 layers (MiB, log; 1.58-bit trits + fp16 angles, dense fp32)")
        ax.set_ylabel(f"WikiText-2 {ylabel} (BPE 8192 tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    seeds = sorted({len(complete(groups[k])) for k in wt_configs(groups) if complete(groups[k])})
    fig.suptitle("WikiText-2, d 512, 4 layers, 24.6M training tokens: mean ± std over "
                 f"{'/'.join(map(str, seeds))} complete seeds (faint: each seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--update-docs", action="store_true",
                    help="rewrite the generated tables in docs/results.md and docs/ppl_vs_memory.png")
    a = ap.parse_args()
    data = json.loads(Path(a.results).read_text())
    md = tables(data)
    print(md)
    if not a.update_docs:
        plot(data, results_dir("results") / PNG.name)
        return
    plot(data, PNG)
    replace_block(DOC, TAG, md)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
