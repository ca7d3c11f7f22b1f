"""Where decode time goes: bytes each decoded token must read, per component, against tokens/s measured
and the bound a streaming read of the same machine sets (issue 16: "bytes read per token and tokens/s
against the bandwidth limit, whole model").

Bytes per token come from an export's manifest (every tensor's kind, shape and size), as the format
requires them at batch 1: attention, the shared projection, the ternary prototypes, the router and
the norms are read whole; the tied LM head reads the whole token table (the lookup one row of it and
of the position table); of the angle tables (and dense expert tables) only the top-k experts' slices;
the fp32 KV cache at the stated context. They are what the weights force, not what a kernel happens
to read (a ButterflyRotate that precomputes fp32 cos/sin reads more than its angles).

Decode tok/s: ONNX Runtime + the C++ ops (ModelSession), greedy; streaming read: np.max over a
float32 buffer far larger than the caches, on the same thread count. Both are measured in every
repeat, interleaved across exports, median (min–max).

    python benchmarks/decode_bytes.py                     # d1024/4L/N=64 untrained: fp32 + compressed exports
    python benchmarks/decode_bytes.py EXPORT_DIR ...      # given exports
    python benchmarks/decode_bytes.py --update-docs       # also the table block in docs/memory.md
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import cpu_model, publish  # noqa: E402

MIB = 2**20
COMPONENTS = ("attention", "shared_projection", "prototypes", "angles (top-k)", "experts (top-k)", "router",
              "embeddings + LM head", "norms, other", "KV cache")
KIND_COMPONENT = {"attention": "attention", "shared_projection": "shared_projection", "prototypes": "prototypes",
                  "angles": "angles (top-k)", "experts": "experts (top-k)", "router": "router",
                  "embeddings": "embeddings + LM head", "norms": "norms, other", "other": "norms, other"}
# d 1024, 4 layers, d_ff 4096, N=64, top-2, byte vocab (issue 16's table), and the exports compared
D1024 = dict(d_model=1024, n_layers=4, n_heads=16, d_ff=4096, max_seq=256, vocab_size=256, n_experts=64, top_k=2)
EXPORTS = [
    ("fp32", {}, {}),
    ("attn+proj int4, embed int8", {}, {"attn": "int4", "proj": "int4", "embed": "int8"}),
    ("attn+proj ternary (QAT), embed int4, base3, int8 angles", {"ternary_attn": True, "ternary_proj": True},
     {"attn": "ternary", "proj": "ternary", "embed": "int4", "packing": "base3", "angle_dtype": "int8"}),
]


def bytes_per_token(manifest: dict, context: int) -> dict[str, int]:
    """Bytes one decoded token reads per component, at `context` cached positions (batch 1)."""
    cfg = manifest["config"]
    out = dict.fromkeys(COMPONENTS, 0)
    for name, t in manifest["tensors"].items():
        component = KIND_COMPONENT[t["kind"]]
        rows = t["shape"][0] if t["shape"] else 1
        if t["kind"] in ("angles", "experts"):  # [E, ...]: the top-k experts' slices
            out[component] += cfg["top_k"] * t["bytes"] // rows
        elif "pos_emb" in name:  # one position's row
            out[component] += t["bytes"] // rows
        elif "tok_emb" in name:  # the tied head reads it all, the lookup one row more
            out[component] += t["bytes"] + t["bytes"] // rows
        else:
            out[component] += t["bytes"]
    out["KV cache"] = cfg["n_layers"] * 2 * context * cfg["d_model"] * 4  # fp32 keys and values
    return out


def stream_read_gbs(buf: np.ndarray) -> float:
    """One pass of np.max over `buf` (a SIMD reduction: bound by the read), GB/s."""
    start = time.perf_counter()
    buf.max()
    return buf.nbytes / (time.perf_counter() - start) / 1e9


def decode_tok_s(model_dir: Path, prompt: list[int], n: int, threads: int) -> float:
    from bmoe_runtime.runtime.generate import GenerationStats, Generator
    from bmoe_runtime.runtime.session import ModelSession

    stats = GenerationStats()
    for _ in Generator(ModelSession(model_dir, backend="ort", threads=threads)).tokens(prompt, n, stats=stats):
        pass
    return stats.decode_tok_s


def op_times(model_dir: Path, prompt: list[int], n: int, threads: int) -> dict[str, float]:
    """ms per decoded token by ONNX operator type (ORT's profiler, one greedy run of n tokens; the prompt's
    step excluded), plus "run overhead": session run time outside the kernels."""
    import onnxruntime as ort

    from bmoe_runtime.backends import ort_ops

    opts = ort.SessionOptions()
    ort_ops.register(opts, model_dir=model_dir)
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "decode")
        sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        cfg = json.loads((model_dir / "manifest.json").read_text())["config"]
        d_head = cfg["d_model"] // cfg["n_heads"]
        kv = {f"past_{kind}_{i}": np.zeros((1, cfg["n_heads"], 0, d_head), np.float32)
              for i in range(cfg["n_layers"]) for kind in ("key", "value")}
        ids, pos = prompt, 0
        for _ in range(n + 1):
            out = sess.run(None, {"input_ids": np.array([ids], np.int64),
                                  "attention_mask": np.ones((1, pos + len(ids)), np.int64),
                                  "position_ids": np.arange(pos, pos + len(ids), dtype=np.int64)[None], **kv})
            pos += len(ids)
            ids = [int(out[0][0, -1].argmax())]
            kv = {name.replace("present", "past"): v for name, v in zip((o.name for o in sess.get_outputs()), out)
                  if name.startswith("present")}
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"]  # the prompt's step
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            op = e["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / n
    per_op["run overhead"] = sum(r["dur"] for r in runs[1:]) / 1e3 / n - sum(per_op.values())
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def synthetic_exports(work: Path) -> list[tuple[str, Path]]:
    import torch

    from bmoe_runtime.format.tokenizer import ByteTokenizer
    from bmoe_runtime.nn.model import ModelConfig, MoELM
    from bmoe_runtime.train.checkpoint import save_checkpoint
    from exporters import ExportOptions, export_checkpoint

    out = []
    for i, (name, cfg_extra, opts) in enumerate(EXPORTS):
        torch.manual_seed(0)
        save_checkpoint(work / "m.pt", MoELM(ModelConfig(**D1024, **cfg_extra)), ByteTokenizer(), {})
        out.append((name, export_checkpoint(work / "m.pt", work / f"x{i}", ExportOptions(**opts))))
        print(f"exported {name}", flush=True)
    return out


def run(exports: list[tuple[str, Path]], repeats: int, n: int, threads: int, buffer_mib: int) -> dict:
    prompt = list(b"ROMEO: the ")  # byte ids; below every vocabulary bmoe trains
    context = len(prompt) + n // 2  # the mean cached length over the timed tokens
    rows = [{"export": name, "dir": d, "bytes": bytes_per_token(json.loads((d / "manifest.json").read_text()), context),
             "tok_s": []} for name, d in exports]
    buf = np.ones(buffer_mib * MIB // 4, np.float32)
    bandwidth = []
    for _ in range(repeats):  # interleaved: each export and the bandwidth see the same stretch of machine load
        bandwidth.append(statistics.median(stream_read_gbs(buf) for _ in range(3)))
        for r in rows:
            r["tok_s"].append(decode_tok_s(r["dir"], prompt, n, threads))
    gbs = statistics.median(bandwidth)
    for r in rows:
        r["ms_by_op"] = op_times(r.pop("dir"), prompt, n, threads)
        total = sum(r["bytes"].values())
        r["bytes_per_token"] = total
        r["bound_tok_s"] = gbs * 1e9 / total
        r["tok_s_median"] = statistics.median(r["tok_s"])
        r["of_bound"] = r["tok_s_median"] / r["bound_tok_s"]
    return {"cpu": cpu_model(), "threads": threads, "repeats": repeats, "decode_tokens": n, "context": context,
            "stream_read_gbs": bandwidth, "stream_read_gbs_median": gbs, "buffer_mib": buffer_mib, "rows": rows}


def table(res: dict) -> str:
    gbs = res["stream_read_gbs"]
    lines = [f"{res['cpu']}, {res['threads']} thread(s), ORT + C++ ops; {res['decode_tokens']} greedy tokens, "
             f"median (min–max) of {res['repeats']} repeats interleaved with the streaming read "
             f"({statistics.median(gbs):.1f} ({min(gbs):.1f}–{max(gbs):.1f}) GB/s, np.max over "
             f"{res['buffer_mib']} MiB); KV cache at {res['context']} positions. MiB per decoded token:", "",
             "| export | " + " | ".join(COMPONENTS) + " | **total** | bound tok/s | measured tok/s | of bound "
             "| ms/token: reads at bandwidth + the rest |",
             "|---|" + "---|" * (len(COMPONENTS) + 5)]
    for r in res["rows"]:
        b = r["bytes"]
        t = r["tok_s"]
        lines.append(f"| {r['export']} | " + " | ".join(f"{b[c] / MIB:.2f}" for c in COMPONENTS)
                     + f" | **{r['bytes_per_token'] / MIB:.2f}** | {r['bound_tok_s']:.0f} | "
                       f"{r['tok_s_median']:.0f} ({min(t):.0f}–{max(t):.0f}) | {100 * r['of_bound']:.0f} % | "
                       f"{1e3 / r['bound_tok_s']:.2f} + {1e3 / r['tok_s_median'] - 1e3 / r['bound_tok_s']:.2f} |")
    rows = res["rows"]
    share = {op: max(r["ms_by_op"].get(op, 0) / sum(r["ms_by_op"].values()) for r in rows)
             for r0 in rows for op in r0["ms_by_op"]}
    ops = sorted((op for op in share if share[op] >= 0.02 and op != "run overhead"),
                 key=lambda op: -rows[0]["ms_by_op"].get(op, 0))
    lines += ["", "ms per decoded token by operator (ORT's profiler, one run of the same tokens, not interleaved: "
              "the profiler's own cost per node and the machine's load inflate it — compare its total with the timed "
              "one; read it for shares):", "",
              "| operator | " + " | ".join(r["export"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{r['ms_by_op'].get(op, 0):.3f}" for r in rows) + " |")
    other = [sum(v for op, v in r["ms_by_op"].items() if op not in ops and op != "run overhead") for r in rows]
    lines.append("| other operators | " + " | ".join(f"{v:.3f}" for v in other) + " |")
    lines.append("| outside the kernels (session run) | " + " | ".join(f"{r['ms_by_op']['run overhead']:.3f}"
                                                                      for r in rows) + " |")
    lines.append("| **total profiled** | " + " | ".join(f"**{sum(r['ms_by_op'].values()):.3f}**" for r in rows) + " |")
    lines.append("| timed, unprofiled (1 / median tok/s) | " + " | ".join(f"{1e3 / r['tok_s_median']:.3f}"
                                                                           for r in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="*", type=Path, help="export directories [build the d1024/N=64 set]")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-n", type=int, default=64, help="decoded tokens per timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buffer-mib", type=int, default=512, help="streaming-read buffer (≫ last-level cache)")
    ap.add_argument("--out", help="results directory [runs/bench/decode_bytes]")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the table block in docs/memory.md and docs/decode_bytes.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exports = [(d.name, d) for d in args.exports] or synthetic_exports(Path(tmp))
        res = run(exports, args.repeats, args.n, args.threads, args.buffer_mib)
    publish("decode_bytes", res, table(res), args.out, args.update_docs, "memory.md", "decode-bytes-table")


if __name__ == "__main__":
    main()
