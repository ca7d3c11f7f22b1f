"""What int8 / fp16 angles and base-3 trits cost in quality: the exported model's own loss.

Exports a checkpoint with each storage option, runs every export with ONNX Runtime (the
C++ ops) over the validation split in windows of the model's context, and reports loss,
bits per character and the change against fp32 angles.

    python benchmarks/angle_dtype_ppl.py runs/default_model.pt --data ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bmoe_runtime.train.checkpoint import load_model  # noqa: E402
from bmoe_runtime.train.data import load_corpus  # noqa: E402
from bmoe_runtime.runtime.generate import Generator  # noqa: E402
from bmoe_runtime.runtime.session import ModelSession  # noqa: E402
from exporters import ExportOptions, export_checkpoint  # noqa: E402

OPTIONS = [("2bit", "fp32"), ("2bit", "fp16"), ("base3", "fp16"), ("2bit", "int8"), ("base3", "int8")]


def nll(gen: Generator, ids: np.ndarray, window: int) -> float:
    """Mean nats/token over non-overlapping windows (each a fresh context)."""
    total, n = 0.0, 0
    for s in range(0, len(ids) - window - 1, window):
        x, y = ids[s:s + window], ids[s + 1:s + window + 1]
        logits, _ = gen.step(x[None], gen.empty_cache())
        z = logits[0].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(window), y].sum()
        n += window
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    _, tok, ckpt = load_model(args.checkpoint)
    text = load_corpus(args.data).valid
    ids = np.asarray(tok.encode(text), np.int64)
    window = ckpt["config"]["max_seq"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for packing, angles in OPTIONS:
            out = export_checkpoint(args.checkpoint, Path(tmp) / f"{packing}_{angles}", ExportOptions(packing, angles))
            loss = nll(Generator(ModelSession(out, backend="ort")), ids, window)
            manifest = json.loads((out / "manifest.json").read_text())
            kinds = manifest["bytes_by_kind"]
            rows.append({"packing": packing, "angles": angles, "loss": loss,
                         "bpc": loss * len(ids) / (len(text) * math.log(2)),
                         "expert_bytes": kinds.get("prototypes", 0) + kinds.get("angles", 0)})
            print(f"{packing:5s} {angles}: loss {loss:.5f} nats/token, {rows[-1]['bpc']:.4f} bpc", flush=True)
    base = rows[0]["loss"]
    print("\n| trits | angles | expert bytes | valid loss (nats/token) | bpc | change vs fp32 angles |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['packing']} | {r['angles']} | {r['expert_bytes']:,} | {r['loss']:.5f} | {r['bpc']:.4f} | "
              f"{100 * (r['loss'] / base - 1):+.3f} % |")


if __name__ == "__main__":
    main()
