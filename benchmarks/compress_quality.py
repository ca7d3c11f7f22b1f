"""What compressing the dense weights (bmoe-export --attn/--proj/--embed) costs and gains, on exported files.

For each option and combination: exported directory size (every file the manifest lists), validation
loss/ppl of the export run with ONNX Runtime + the C++ ops (non-overlapping windows of the training
context, each a fresh one, as angle_dtype_ppl.py), and greedy decode tokens/s at a fixed thread count (repeats interleaved across
variants so they share the machine's conditions; median and min–max). Ratios are against the fp32
export of the same checkpoint, in the same run.

    python benchmarks/compress_quality.py --fp32 fp32.pt --qat qat.pt --data ../shared/data/tinyshakespeare/input.txt
    python benchmarks/compress_quality.py --synthetic paper --data ../shared/data/wikitext-2   # N=256: sizes
    python benchmarks/compress_quality.py --synthetic d1024 --experts 64 --repeats 3   # sizes + decode tok/s
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from angle_dtype_ppl import nll  # noqa: E402
from results import cpu_model  # noqa: E402
from bmoe_runtime.format.tokenizer import ByteTokenizer  # noqa: E402
from bmoe_runtime.runtime.generate import GenerationStats, Generator  # noqa: E402
from bmoe_runtime.runtime.session import ModelSession  # noqa: E402
from bmoe_runtime.train.checkpoint import load_model, save_checkpoint  # noqa: E402
from bmoe_runtime.train.data import load_corpus  # noqa: E402
from exporters import ExportOptions, export_checkpoint  # noqa: E402

MIB = 2**20
# (name, checkpoint: fp32-trained or QAT-trained, export options)
VARIANTS = [
    ("fp32", "fp32", {}),
    ("attn int4", "fp32", {"attn": "int4"}),
    ("proj int4", "fp32", {"proj": "int4"}),
    ("embed int8", "fp32", {"embed": "int8"}),
    ("embed int4", "fp32", {"embed": "int4"}),
    ("attn+proj int4, embed int8 (default combination)", "fp32", {"attn": "int4", "proj": "int4", "embed": "int8"}),
    ("attn+proj int4, embed int4", "fp32", {"attn": "int4", "proj": "int4", "embed": "int4"}),
    ("act_quant (int8 activations into TernaryMatMul)", "fp32", {"act_quant": True}),
    ("default combination + act_quant", "fp32", {"attn": "int4", "proj": "int4", "embed": "int8", "act_quant": True}),
    ("QAT: fp32 export (trits·scale dense)", "qat", {}),
    ("QAT: attn+proj ternary", "qat", {"attn": "ternary", "proj": "ternary"}),
    ("QAT: attn+proj ternary, embed int8", "qat", {"attn": "ternary", "proj": "ternary", "embed": "int8"}),
    ("QAT: all on (ternary, embed int4, base3, int8 angles)", "qat",
     {"attn": "ternary", "proj": "ternary", "embed": "int4", "packing": "base3", "angle_dtype": "int8"}),
]
# untrained models: sizes (and decode speed) do not depend on training
SYNTHETIC = {
    "paper": dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048, max_seq=128, vocab_size=8192),  # BPE 8192 runs
    "d1024": dict(d_model=1024, n_layers=4, n_heads=16, d_ff=4096, max_seq=256, vocab_size=256),  # issue 16's table
}
SYNTHETIC_VARIANTS = [
    ("fp32 (today's default export)", {}, {}),
    ("attn+proj int4, embed int8", {}, {"attn": "int4", "proj": "int4", "embed": "int8"}),
    ("attn+proj int4, embed int4, base3, int8 angles", {},
     {"attn": "int4", "proj": "int4", "embed": "int4", "packing": "base3", "angle_dtype": "int8"}),
    ("all on: attn+proj ternary (QAT), embed int4, base3, int8 angles", {"ternary_attn": True, "ternary_proj": True},
     {"attn": "ternary", "proj": "ternary", "embed": "int4", "packing": "base3", "angle_dtype": "int8"}),
]


def dir_bytes(out: Path) -> tuple[int, dict[str, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return (sum(f["bytes"] for f in manifest["files"].values()) + (out / "manifest.json").stat().st_size,
            manifest["bytes_by_kind"])


def decode_tok_s(out: Path, threads: int, prompt: list[int], n: int) -> tuple[float, list[int]]:
    gen = Generator(ModelSession(out, backend="ort", threads=threads))
    stats = GenerationStats()
    tokens = list(gen.tokens(prompt, n, stats=stats))
    return stats.decode_tok_s, tokens


def quality(args) -> dict:
    ckpts = {"fp32": args.fp32, "qat": args.qat}
    # each checkpoint's first variant (its plain export, the base of its ratios) always, the others when --only
    # names them (all by default)
    bases = {next(v[0] for v in VARIANTS if v[1] == which) for which in ckpts}
    variants = [v for v in VARIANTS if ckpts[v[1]] and (v[0] in bases or not args.only or
                                                         any(o in v[0] for o in args.only.split(",")))]
    _, tok, ckpt = load_model(args.fp32)
    text = load_corpus(args.data).valid
    ids = np.asarray(tok.encode(text), np.int64)[:args.max_tokens or None]
    # the context it was trained on (positions beyond it never were); max_seq when the checkpoint does not say
    window = ckpt.get("train_state", {}).get("train_config", {}).get("seq") or ckpt["config"]["max_seq"]
    prompt = tok.encode(args.prompt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, which, opts) in enumerate(variants):
            out = export_checkpoint(ckpts[which], Path(tmp) / f"v{i}", ExportOptions(**opts))
            total, kinds = dir_bytes(out)
            loss = nll(Generator(ModelSession(out, backend="ort")), ids, window)
            rows.append({"name": name, "checkpoint": which, "options": opts, "dir": str(out), "bytes": total,
                         "bytes_by_kind": kinds, "loss": loss, "ppl": math.exp(loss), "tok_s": []})
            print(f"{name}: {total / MIB:.3f} MiB, valid loss {loss:.5f} (ppl {math.exp(loss):.3f})", flush=True)
        for rep in range(args.repeats):  # interleaved: every variant sees the same stretch of machine load
            for r in rows:
                tok_s, tokens = decode_tok_s(Path(r["dir"]), args.threads, prompt, args.n)
                r["tok_s"].append(tok_s)
                r.setdefault("tokens", tokens)
    base = {which: next(r for r in rows if r["checkpoint"] == which) for which in ckpts if ckpts[which]}
    for r in rows:
        b = base[r["checkpoint"]]
        r["ppl_change"] = r["ppl"] / base["fp32"]["ppl"] - 1
        r["ppl_change_same_ckpt"] = r["ppl"] / b["ppl"] - 1
        r["size_ratio"] = base["fp32"]["bytes"] / r["bytes"]
        r["tok_s_median"] = statistics.median(r["tok_s"])
        r["speedup"] = r["tok_s_median"] / statistics.median(base["fp32"]["tok_s"])
        del r["dir"]
    return {"cpu": cpu_model(), "threads": args.threads, "repeats": args.repeats, "decode_tokens": args.n,
            "valid_tokens": int(len(ids)), "window": window, "fp32_checkpoint": args.fp32, "qat_checkpoint": args.qat,
            "fp32_metrics": {k: v for k, v in ckpt["metrics"].items() if k != "history"}, "rows": rows}


def print_quality(res: dict) -> None:
    print(f"\n{res['cpu']}, ORT + C++ ops, {res['threads']} thread(s); decode: {res['decode_tokens']} greedy tokens, "
          f"median (min–max) of {res['repeats']} interleaved repeats; valid: {res['valid_tokens']:,} tokens in "
          f"windows of {res['window']}")
    print("\n| export | checkpoint | directory | × smaller | valid ppl | ppl vs fp32 export | vs same ckpt fp32 "
          "| decode tok/s | × fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['name']} | {r['checkpoint']} | {r['bytes'] / MIB:.3f} MiB | {r['size_ratio']:.2f} | "
              f"{r['ppl']:.3f} | {100 * r['ppl_change']:+.2f} % | {100 * r['ppl_change_same_ckpt']:+.2f} % | "
              f"{r['tok_s_median']:.0f} ({min(r['tok_s']):.0f}–{max(r['tok_s']):.0f}) | {r['speedup']:.2f} |")


def synthetic(args) -> dict:
    """Untrained models of a given shape, N experts: directory sizes, and decode tok/s with --repeats > 0."""
    import torch

    from bmoe_runtime.nn.model import ModelConfig, MoELM

    config = {**SYNTHETIC[args.synthetic], "n_experts": args.experts, "top_k": 2}
    tok = ByteTokenizer()
    if config["vocab_size"] != tok.vocab_size:  # the export checks the tokenizer against the vocabulary
        from bmoe_runtime.train.data import scan_corpus
        from bmoe_runtime.train.trainer import build_tokenizer

        if not args.data:
            raise SystemExit(f"--synthetic {args.synthetic} needs --data (a corpus to train its BPE tokenizer)")
        tok = build_tokenizer("bpe", scan_corpus(args.data), config["vocab_size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg_extra, opts) in enumerate(SYNTHETIC_VARIANTS):
            torch.manual_seed(0)
            save_checkpoint(Path(tmp) / "m.pt", MoELM(ModelConfig(**config, **cfg_extra)), tok, {})
            out = export_checkpoint(Path(tmp) / "m.pt", Path(tmp) / f"x{i}", ExportOptions(**opts))
            total, kinds = dir_bytes(out)
            rows.append({"name": name, "options": opts, "bytes": total, "bytes_by_kind": kinds, "dir": str(out),
                         "tok_s": []})
            print(f"{name}: {total / MIB:.2f} MiB  " + ", ".join(f"{k} {v / MIB:.2f}" for k, v in kinds.items()),
                  flush=True)
        prompt = list(args.prompt.encode())
        for rep in range(args.repeats):  # interleaved, as in quality()
            for r in rows:
                r["tok_s"].append(decode_tok_s(Path(r["dir"]), args.threads, prompt, args.n)[0])
    for r in rows:
        del r["dir"]
        if r["tok_s"]:
            r["tok_s_median"] = statistics.median(r["tok_s"])
            r["speedup"] = r["tok_s_median"] / statistics.median(rows[0]["tok_s"])
    return {"shape": args.synthetic, "config": config, "cpu": cpu_model(), "threads": args.threads,
            "repeats": args.repeats, "decode_tokens": args.n, "rows": rows}


def print_synthetic(res: dict) -> None:
    kinds = ["attention", "shared_projection", "embeddings", "prototypes", "angles"]
    c = res["config"]
    speed = res["repeats"] > 0
    print(f"\nuntrained, d {c['d_model']}, {c['n_layers']} layers, d_ff {c['d_ff']}, N={c['n_experts']}, "
          f"vocab {c['vocab_size']}; sizes in MiB" + (f"; decode: {res['cpu']}, ORT + C++ ops, {res['threads']} "
                                                       f"thread(s), {res['decode_tokens']} greedy tokens, median "
                                                       f"(min–max) of {res['repeats']} interleaved repeats"
                                                       if speed else ""))
    print("\n| export | total | " + " | ".join(kinds) + " | other |" + (" decode tok/s | × fp32 |" if speed else ""))
    print("|---|---|" + "---|" * (len(kinds) + 1) + ("---|---|" if speed else ""))
    for r in res["rows"]:
        k = r["bytes_by_kind"]
        other = r["bytes"] - sum(k.get(x, 0) for x in kinds)
        line = (f"| {r['name']} | **{r['bytes'] / MIB:.2f}** | " + " | ".join(f"{k.get(x, 0) / MIB:.2f}" for x in kinds)
                + f" | {other / MIB:.2f} |")
        if speed:
            line += f" {r['tok_s_median']:.1f} ({min(r['tok_s']):.1f}–{max(r['tok_s']):.1f}) | {r['speedup']:.2f} |"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", help="checkpoint trained without QAT (bmoe-train)")
    ap.add_argument("--qat", help="the same run with --ternary attn --ternary proj (optional)")
    ap.add_argument("--data", help="corpus whose validation split is scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="decode timings per variant [5; 0 with --synthetic]")
    ap.add_argument("-n", type=int, default=128, help="decoded tokens per timing")
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--max-tokens", type=int, default=0, help="score only the first N validation tokens (0: all)")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="instead: untrained models of this shape")
    ap.add_argument("--experts", type=int, default=256, help="with --synthetic")
    ap.add_argument("--only", help="comma-separated substrings: score only the variants whose name has one")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.synthetic:
        args.repeats = args.repeats or 0
        res = synthetic(args)
        print_synthetic(res)
    else:
        if not (args.fp32 and args.data):
            ap.error("--fp32 and --data are required (or --synthetic)")
        args.repeats = args.repeats or 5
        res = quality(args)
        print_quality(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
