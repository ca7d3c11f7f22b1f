"""Streamed angles: LRU hit rate and decode speed against the angle cache size.

For each cache size c (experts a layer whose cos/sin tables a streamed ButterflyRotate keeps)
and each backend, one ModelSession(model, backend, angle_cache_slots=c) generates greedily
from WikiText-2 prompts (the first lines of the test split; the models are byte-level, so a
prompt is its text). Counted per prompt, decode only: the counters are reset once the prompt's
step (prefill) has run, so the prefill's misses are left out. The cache carries over from
prompt to prompt, as in a long-running process. "resident" is the unstreamed session.

Reported: decode hit rate and miss fraction (pooled over the prompts), the miss fraction the
planner assumes for uniform routing (1 - c/N), misses and KiB read from angles.bin per token,
and the median decode tok/s over the prompts. A counter counts one look-up per expert per
ButterflyRotate call, and the paper form has two calls a MoE layer (θ and φ).

    python benchmarks/bench_streaming.py                       # bundled model, ort then numba
    python benchmarks/bench_streaming.py --model big --cache 2,4,8,16,32,64,all --backends ort \
        --prompts 6 -n 32 --md docs/planner.md --png docs/streaming_hit_rate.png
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bmoe_runtime import default_model_dir  # noqa: E402
from bmoe_runtime.backends import ort_ops  # noqa: E402
from bmoe_runtime.runtime import streaming  # noqa: E402
from bmoe_runtime.runtime.generate import GenerationStats, Generator  # noqa: E402
from bmoe_runtime.runtime.session import ModelSession  # noqa: E402
from benchmarks.results import cpu_model  # noqa: E402

WIKITEXT = Path("/work/shared/data/wikitext-2/test.txt")
SECTION = "## Streaming: hit rate and speed against cache size"


def prompts(path: Path, count: int, max_bytes: int) -> list[str]:
    """The first `count` text lines (no blank lines, no ' = Heading = ' lines), cut to max_bytes."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        out.append(line.encode()[:max_bytes].decode(errors="ignore"))
        if len(out) == count:
            break
    return out


def run_one(model: Path, backend: str, cache: int | None, texts: list[str], n_new: int, threads: int) -> dict:
    t0 = time.perf_counter()
    gen = Generator(ModelSession(model, backend, threads, angle_cache_slots=cache))
    load_s = time.perf_counter() - t0
    hits = misses = nbytes = tokens = 0
    tok_s, outs = [], []
    for text in texts:
        st = GenerationStats()
        ids = []
        for i, tok in enumerate(gen.tokens(gen.tokenizer.encode(text), n_new, 0.0, 0, st)):
            if i == 0 and cache is not None:
                streaming.reset(backend)  # the prompt's step has run: count decode steps only
            ids.append(tok)
        if cache is not None:
            c = streaming.cache_stats(backend)
            hits, misses, nbytes = hits + c["hits"], misses + c["misses"], nbytes + c["bytes_read"]
        tokens += n_new - 1  # decode steps after the first token
        tok_s.append(st.decode_tok_s)
        outs.append(ids)
    look = hits + misses
    return {"cache": cache, "load_s": load_s, "hits": hits, "misses": misses, "bytes_read": nbytes,
            "decode_steps": tokens, "hit_rate": hits / look if look else None,
            "miss_fraction": misses / look if look else None,
            "misses_per_token": misses / tokens if cache is not None else 0.0,
            "kib_per_token": nbytes / 1024 / tokens if cache is not None else 0.0,
            "tok_s_median": statistics.median(tok_s), "tok_s": tok_s, "tokens": outs}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"<!-- bench_streaming:{m['tag']} begin -->",
             f"**{m['model_desc']}**: {m['prompts']} WikiText-2 test prompts (first lines, ≤ {m['prompt_bytes']} "
             f"bytes), {m['n_new']} greedy tokens each; {m['cpu']}, {m['threads']} threads "
             f"({m['cores']} cores, shared with other processes). Counters are decode only; tok/s is the median "
             f"over prompts. `python benchmarks/bench_streaming.py {m['args']}`", ""]
    lines += ["| backend | cache c / N | hit rate | miss fraction | uniform 1 − c/N | misses / token | "
              "KiB read / token | decode tok/s | tokens = resident |",
              "|---|---|---|---|---|---|---|---|---|"]
    n = m["n_experts"]
    for backend, rows in res["runs"].items():
        ref = next((r["tokens"] for r in rows if r["cache"] is None), None)
        for r in rows:
            c = r["cache"]
            if c is None:
                lines.append(f"| {backend} | resident | – | – | – | – | – | {r['tok_s_median']:.1f} | – |")
                continue
            same = "–" if ref is None else ("yes" if r["tokens"] == ref else "NO")
            lines.append(f"| {backend} | {c} / {n} | {r['hit_rate']:.3f} | {r['miss_fraction']:.3f} | "
                         f"{1 - min(c, n) / n:.3f} | {r['misses_per_token']:.2f} | {r['kib_per_token']:.1f} | "
                         f"{r['tok_s_median']:.1f} | {same} |")
    lines.append(f"<!-- bench_streaming:{m['tag']} end -->")
    return "\n".join(lines)


def write_md(path: Path, block: str, tag: str) -> None:
    text = path.read_text(encoding="utf-8")
    pat = re.compile(rf"<!-- bench_streaming:{re.escape(tag)} begin -->.*?<!-- bench_streaming:{re.escape(tag)} end -->",
                     re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    elif SECTION in text:  # append to the section: before the next heading after it
        start = text.index(SECTION) + len(SECTION)
        nxt = text.find("\n## ", start)
        nxt = len(text) if nxt < 0 else nxt
        text = text[:nxt].rstrip("\n") + "\n\n" + block + "\n" + text[nxt:]
    else:  # a new section before "## Limits" (or at the end)
        at = text.find("\n## Limits")
        at = len(text) if at < 0 else at
        text = text[:at].rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n" + text[at:]
    path.write_text(text, encoding="utf-8")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = res["meta"]["n_experts"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for backend, rows in res["runs"].items():
        st = [r for r in rows if r["cache"] is not None]
        xs = [r["cache"] for r in st]
        a.plot(xs, [r["miss_fraction"] for r in st], "o-", label=f"measured LRU ({backend})")
        b.plot(xs, [r["tok_s_median"] for r in st], "o-", label=f"{backend} streamed")
        resident = [r for r in rows if r["cache"] is None]
        if resident:
            b.axhline(resident[0]["tok_s_median"], ls=":", color=b.lines[-1].get_color(), label=f"{backend} resident")
    xs = sorted({r["cache"] for rows in res["runs"].values() for r in rows if r["cache"] is not None})
    a.plot(xs, [1 - c / n for c in xs], "k--", label="uniform routing 1 − c/N (planner)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"cache c (experts a layer, of N = {n})")
        ax.legend(fontsize=8)
    a.set_ylabel("decode miss fraction")
    b.set_ylabel("decode tok/s (median)")
    fig.suptitle(res["meta"]["model_desc"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="exported model dir (default: the bundled model)")
    ap.add_argument("--desc", default=None, help="model description for the table")
    ap.add_argument("--cache", default="2,4,8,16,all", help="cache sizes, comma separated; 'all' = N")
    ap.add_argument("--backends", default="ort,numba")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-bytes", type=int, default=128)
    ap.add_argument("-n", "--n-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-resident", action="store_true", help="skip the unstreamed reference run")
    ap.add_argument("--md", type=Path, help="write the table into this markdown file (docs/planner.md)")
    ap.add_argument("--png", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    model = Path(args.model) if args.model else default_model_dir()
    manifest = json.loads((model / "manifest.json").read_text())
    cfg = manifest["config"]
    n = cfg["n_experts"]
    sizes = sorted({n if c == "all" else min(int(c), n) for c in args.cache.split(",")})
    texts = prompts(WIKITEXT, args.prompts, args.prompt_bytes)
    backends = [b for b in args.backends.split(",") if b]
    if "ort" in backends and not ort_ops.available():
        print("libbmoe_ops.so is not built: skipping ort", flush=True)
        backends.remove("ort")
    desc = args.desc or (f"{model.name}: {cfg['n_layers']} layers, d={cfg['d_model']}, N={n} experts, "
                         f"top-{cfg['top_k']}")
    argv = " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])
    res = {"meta": {"tag": model.name, "model": str(model), "model_desc": desc, "n_experts": n, "top_k": cfg["top_k"],
                    "prompts": len(texts), "prompt_bytes": args.prompt_bytes, "n_new": args.n_new,
                    "threads": args.threads, "cores": len(os.sched_getaffinity(0)), "cpu": cpu_model(),
                    "args": argv}, "runs": {}}
    print(f"{desc}; {res['meta']['cpu']}, {args.threads} threads; {len(texts)} prompts × {args.n_new} tokens",
          flush=True)
    for backend in backends:
        rows = []
        for c in ([] if args.no_resident else [None]) + sizes:
            t = time.perf_counter()
            r = run_one(model, backend, c, texts, args.n_new, args.threads)
            rows.append(r)
            label = "resident" if c is None else f"c={c}/{n}"
            extra = "" if c is None else (f" hit {r['hit_rate']:.3f} (uniform {c / n:.3f}), "
                                          f"{r['misses_per_token']:.2f} misses/token, {r['kib_per_token']:.1f} KiB/token,")
            print(f"  {backend:5} {label:>10}:{extra} {r['tok_s_median']:.1f} tok/s median "
                  f"[{time.perf_counter() - t:.1f} s]", flush=True)
        res["runs"][backend] = rows
    block = markdown(res)
    print(block)
    if args.md:
        write_md(args.md, block, model.name)
        print(f"wrote {args.md}")
    if args.png:
        plot(res, args.png)
        print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
