"""Turn a trained checkpoint into the bundled default model (bmoe_runtime/models/default), with its numbers.

    python benchmarks/reproduce/bundle_model.py runs/q/bundled_l6_do2.best.pt --steps-done 2750 \
        --data ../shared/data/tinyshakespeare/input.txt [--update-bundle] [--json docs/bundled_model.json]

1. exports it in fp32 and scores that with ONNX Runtime + the C++ ops on the whole validation split (non-overlapping
   windows of the training context, as benchmarks/compress_quality.py): the checkpoint's own nats/char and bpc;
2. writes those metrics (and the training step it reached) into a copy of the checkpoint, with a fresh checksum;
3. exports that with the whole-model compression options (int4 attention and shared projection; embeddings fp32)
   and scores it on the same windows; reports the directory's bytes;
4. writes three sampled continuations from it. --update-bundle replaces the bundled model with it.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from angle_dtype_ppl import nll  # noqa: E402
from bmoe_runtime import default_model_dir  # noqa: E402
from bmoe_runtime.runtime.generate import Generator  # noqa: E402
from bmoe_runtime.format.tokenizer import tokenizer_from_dict  # noqa: E402
from bmoe_runtime.runtime.session import ModelSession  # noqa: E402
from bmoe_runtime.train.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from bmoe_runtime.train.data import load_corpus  # noqa: E402
from exporters import ExportOptions, export_checkpoint  # noqa: E402

# Embeddings stay fp32: a byte vocabulary's tables are 0.75 MiB, and GatherBlockQuantized's `bits` attribute
# (int8 tables) is newer than the ONNX Runtime 1.22 that the aarch64 tests run, which refuses the model.
OPTIONS = {"attn": "int4", "proj": "int4"}
PROMPTS = ("ROMEO:", "First Citizen:\n", "KING RICHARD III:\n")


def score(ckpt: Path, out: Path, options: dict, ids: np.ndarray, window: int) -> tuple[float, Path]:
    out = export_checkpoint(ckpt, out, ExportOptions(**options))
    return float(nll(Generator(ModelSession(out, backend="ort")), ids, window)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps-done", type=int, required=True, help="the training step the checkpoint was saved at")
    ap.add_argument("--update-bundle", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    ckpt = read_checkpoint(a.checkpoint)  # its tokenizer and config; the exporter builds the model
    tok = tokenizer_from_dict(ckpt["tokenizer"])
    ids = np.asarray(tok.encode(load_corpus(a.data).valid), np.int64)
    window = ckpt["config"]["max_seq"]
    with tempfile.TemporaryDirectory() as tmp:
        loss, _ = score(a.checkpoint, Path(tmp) / "fp32", {}, ids, window)
        print(f"fp32 export of the checkpoint: valid {loss:.4f} nats/char, {loss / math.log(2):.3f} bpc "
              f"({len(ids):,} chars, windows of {window})", flush=True)
        valid = {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(loss)}
        ckpt["metrics"] = {**ckpt.get("metrics", {}), "valid": valid, "test": valid,  # no test split: test = valid
                           "steps_done": a.steps_done}
        sealed = Path(tmp) / "sealed.pt"
        write_checkpoint(sealed, ckpt)
        export_loss, out = score(sealed, Path(tmp) / "default", OPTIONS, ids, window)
        manifest = json.loads((out / "manifest.json").read_text())
        size = sum(f["bytes"] for f in manifest["files"].values()) + (out / "manifest.json").stat().st_size
        print(f"export ({OPTIONS}): {size / 1e6:.3f} MB; valid {export_loss:.4f} nats/char, "
              f"{export_loss / math.log(2):.3f} bpc ({100 * (export_loss / loss - 1):+.2f} % vs fp32)", flush=True)
        gen = Generator(ModelSession(out, backend="ort"))
        samples = []
        for i, prompt in enumerate(PROMPTS):
            text, _ = gen.generate(prompt, 160, temperature=0.8, seed=i)
            samples.append({"prompt": prompt, "temperature": 0.8, "seed": i, "text": text})
            print(f"--- {prompt!r} (temperature 0.8, seed {i})\n{prompt}{text}\n", flush=True)
        if a.update_bundle:
            dst = default_model_dir()
            shutil.rmtree(dst)
            shutil.copytree(out, dst)
            print(f"wrote {dst}")
    result = {"checkpoint_valid_nats_per_char": loss, "export_valid_nats_per_char": export_loss,
              "export_bytes": size, "bytes_by_kind": manifest["bytes_by_kind"], "options": OPTIONS,
              "valid_chars": int(len(ids)), "window": window, "steps_done": a.steps_done,
              "config": ckpt["config"], "samples": samples}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
