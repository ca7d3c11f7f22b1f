"""Collect the metrics of every checkpoint in a run folder into one JSON (no weights).

    python benchmarks/reproduce/dump_metrics.py RUN_DIR results_raw.json
    python benchmarks/reproduce/dump_metrics.py --strip model.pt small.pt [--sample sample.txt]
        (drop the optimizer state for bundling; --sample writes a greedy and a sampled continuation)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bmoe_runtime.nn.memory import expert_bytes, model_memory  # noqa: E402
from bmoe_runtime.nn.model import ModelConfig  # noqa: E402
from bmoe_runtime.train.checkpoint import load_model, read_checkpoint, write_checkpoint  # noqa: E402


def _read(p: Path) -> str | None:
    return p.read_text().strip() if p.exists() else None


def collect(run_dir: Path) -> dict:
    runs = {}
    for pt in sorted(run_dir.glob("*.pt")):
        if pt.name.endswith(".best.pt"):  # --keep-best weights: reported with their run, below
            continue
        name = pt.stem
        ckpt = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        cfg = ModelConfig.from_dict(ckpt["config"])
        mem = model_memory(cfg)  # 1.58-bit trits, fp16 angles, everything else fp32
        metrics = ckpt.get("metrics", {})
        state = ckpt.get("train_state", {})
        start, end = _read(run_dir / f"{name}.start"), _read(run_dir / f"{name}.end")
        runs[name] = {
            "config": ckpt["config"], "metrics": metrics, "complete": "test" in metrics,
            "steps_done": state.get("step"), "train_config": state.get("train_config"),
            "rc": _read(run_dir / f"{name}.rc"),
            "wall_seconds": int(end) - int(start) if start and end else None,
            "memory_bytes": {**mem, "expert": expert_bytes(mem)},
        }
        best = run_dir / f"{name}.best.pt"
        if best.exists():  # the step and valid metrics of the weights --keep-best kept
            runs[name]["best"] = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["metrics"]["best"]
    extra = {"gpu": _read(run_dir / "gpu.txt")}
    cmds = run_dir / "commands.txt"
    return {"runs": runs, "commands": cmds.read_text().splitlines() if cmds.exists() else [], **extra}


def strip(src: Path, dst: Path, sample: Path | None) -> None:
    ckpt = read_checkpoint(src)
    ckpt.pop("train_state", None)
    write_checkpoint(dst, ckpt)
    print(f"{dst}: {dst.stat().st_size / 2**20:.2f} MiB")
    if sample:
        model, tok, _ = load_model(dst)
        lines = []
        for prompt in ("ROMEO:", "First Citizen:\n"):
            ids = torch.tensor([tok.encode(prompt)])
            for temp in (0.0, 0.8):
                out = model.generate(ids, 200, temp, torch.Generator().manual_seed(0))
                lines.append(f"--- prompt {prompt!r}, temperature {temp}\n{tok.decode(out[0].tolist())}\n")
        sample.write_text("\n".join(lines))
        print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--strip", action="store_true")
    ap.add_argument("--sample")
    a = ap.parse_args()
    if a.strip:
        strip(Path(a.src), Path(a.dst), Path(a.sample) if a.sample else None)
    else:
        data = collect(Path(a.src))
        Path(a.dst).write_text(json.dumps(data, indent=1))
        print(f"{len(data['runs'])} runs -> {a.dst}")
