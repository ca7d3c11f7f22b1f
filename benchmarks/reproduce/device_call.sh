#!/usr/bin/env bash
# One machine call of issue 15's quality runs, from the repo root on the GPU machine (the device tool sets $OUT and
# carries .data/ = copies of ../shared/data). Run it again while the machine is warm: finished runs are skipped,
# stopped ones resume. Back in $OUT: runner.log, results_raw.json, logs.tgz (with smi.log: GPU use every 10 s),
# and the bundled-model candidate with the lowest kept valid loss (its .best.pt), in 15 MB parts (cat them together).
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
run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
done = {}  # each candidate's kept best weights (--keep-best; whole-split valid loss), finished or not
for pt in sorted(run_dir.glob("bundled_*.best.pt")):
    best = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)["metrics"]["best"]
    done[pt] = best["valid"]["loss"]
    print(f"{pt.name}: step {best['step']}, valid loss {best['valid']['loss']:.4f} nats/char, "
          f"{best['valid']['bpc']:.3f} bpc")
if done:
    best = min(done, key=done.get)
    data = best.read_bytes()  # already without training state; the checksum is its own
    for i in range(0, len(data), 15 << 20):
        (out / f"{best.name}.part{i // (15 << 20)}").write_bytes(data[i:i + (15 << 20)])
    print(f"best: {best.name}, {len(data) / 2**20:.1f} MiB in parts")
PY
ls -la "$OUT"
