#!/usr/bin/env bash
# One machine call of issue 15's quality runs, from the repo root on the GPU machine (the device tool sets $OUT and
# carries .data/ = copies of ../shared/data). Run it again while the machine is warm: finished runs are skipped,
# stopped ones resume. Back in $OUT: runner.log, results_raw.json, logs.tgz (with smi.log: GPU use every 10 s),
# and the best finished bundled-model candidate without its optimizer state, in 15 MB parts (cat them together).
set -u
RUN_DIR=/tmp/bmoe_runs
mkdir -p "$RUN_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
( while true; do nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader; sleep 10; done ) \
  >> "$RUN_DIR/smi.log" 2>&1 &
SMI=$!
python3 benchmarks/reproduce/quality_runs.py --data .data --run-dir "$RUN_DIR" --out "$OUT" "$@" 2>&1 | tee "$OUT/runner.log"
kill $SMI
python3 - "$RUN_DIR" "$OUT" <<'PY'
import sys, torch
from pathlib import Path
from bmoe_runtime.train.checkpoint import write_checkpoint
run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
done = {}
for pt in sorted(run_dir.glob("bundled_*.pt")):
    m = torch.load(pt, map_location="cpu", weights_only=True, mmap=True).get("metrics", {})
    if "test" in m:
        done[pt] = m["valid"]["loss"]
        print(f"{pt.name}: valid loss {m['valid']['loss']:.4f} nats/char, {m['valid']['bpc']:.3f} bpc")
if done:
    best = min(done, key=done.get)
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    ckpt.pop("train_state", None)
    write_checkpoint(run_dir / "bundled_best.pt", ckpt)  # a fresh checksum over the stripped content
    data = (run_dir / "bundled_best.pt").read_bytes()
    for i in range(0, len(data), 15 << 20):
        (out / f"{best.stem}.pt.part{i // (15 << 20)}").write_bytes(data[i:i + (15 << 20)])
    print(f"best: {best.name}, {len(data) / 2**20:.1f} MiB in parts")
PY
ls -la "$OUT"
