#!/usr/bin/env bash
# Issue 7: every quality run of docs/results.md, concurrently on ONE GPU (run from the repo root).
#
#   MODE=calibrate LIMIT=150 bash benchmarks/reproduce/gpu_runs.sh   # steps/s of each run when all run together
#   MODE=main GROUP=A|B|all STEPS=... TS_STEPS=... DEF_STEPS=... LIMIT=500 bash benchmarks/reproduce/gpu_runs.sh
#
# Data: DATA_DIR (default .data) holds wikitext-2/{train,valid,test}.txt and tinyshakespeare/input.txt
# (copies of ../shared/data). Checkpoints go to RUN_DIR; metrics, logs and the small default model go to OUT.
set -u
MODE=${MODE:-main}
DATA_DIR=${DATA_DIR:-.data}
RUN_DIR=${RUN_DIR:-/tmp/bmoe_runs}
OUT=${OUT:-/tmp/bmoe_out}
LIMIT=${LIMIT:-500}            # seconds: every training process is killed after this
STEPS=${STEPS:-1000}           # WikiText-2 paper-preset runs (same steps => same tokens for all)
TS_STEPS=${TS_STEPS:-4000}     # TinyShakespeare tiny-preset bpc runs
DEF_STEPS=${DEF_STEPS:-3000}   # the bundled default model
EVALS=${EVALS:-5}              # evaluations along the way (the history curve)
GROUP=${GROUP:-all}            # A: the N=64/256 WikiText-2 runs; B: the rest; all: everything at once
if [ "$MODE" = calibrate ]; then STEPS=100000; TS_STEPS=100000; DEF_STEPS=100000; EVALS=1; fi
mkdir -p "$RUN_DIR" "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=true
PY=${PY:-python3}
WT="$DATA_DIR/wikitext-2"; TS="$DATA_DIR/tinyshakespeare/input.txt"
ev() { echo $(( $1 / EVALS > 0 ? $1 / EVALS : 1 )); }

declare -A CMD
WTC="--data $WT --preset paper --tokenizer bpe --bpe-vocab 8192 --device cuda --seed 0 --steps $STEPS --eval-every $(ev $STEPS)"
for n in 8 64; do
  for v in dense ternary static butterfly; do
    CMD[wt_${v}_n$n]="$WTC --variant $v --experts $n --expert-form paper"
  done
done
CMD[wt_butterfly_n256]="$WTC --variant butterfly --experts 256 --expert-form paper"
# dense non-MoE FFNs of the butterfly N=8 layer's expert bytes (432,374 B/layer, bmoe_runtime.nn.memory):
# d_ff 106: whole FFN (up + down, fp32) = 434,176 B; d_ff 211: the up matrix alone (what memory.py calls experts) = 432,128 B
CMD[wt_densefnn_ff106]="$WTC --variant dense --experts 1 --top-k 1 --d-ff 106 --expert-form paper"
CMD[wt_densefnn_ff211]="$WTC --variant dense --experts 1 --top-k 1 --d-ff 211 --expert-form paper"
TSC="--data $TS --preset tiny --tokenizer byte --device cuda --seed 0 --steps $TS_STEPS --eval-every $(ev $TS_STEPS)"
CMD[ts_dense_n8]="$TSC --variant dense --experts 8 --expert-form paper"
CMD[ts_butterfly_n8]="$TSC --variant butterfly --experts 8 --expert-form paper"
# the small model bundled with the repo (runs/default_model.pt)
CMD[default_model]="--data $TS --preset tiny --tokenizer byte --device cuda --seed 0 --variant butterfly --expert-form paper \
 --d-model 256 --layers 4 --d-ff 512 --experts 16 --top-k 2 --seq 256 --batch 32 --lr 2e-3 --steps $DEF_STEPS --eval-every $(ev $DEF_STEPS)"

GROUP_A="wt_dense_n64 wt_ternary_n64 wt_static_n64 wt_butterfly_n64 wt_butterfly_n256"
for name in "${!CMD[@]}"; do
  inA=0; for a in $GROUP_A; do [ "$a" = "$name" ] && inA=1; done
  if { [ "$GROUP" = A ] && [ $inA = 0 ]; } || { [ "$GROUP" = B ] && [ $inA = 1 ]; }; then unset "CMD[$name]"; fi
done

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' >> "$OUT/gpu.txt" 2>&1
cp "$OUT/gpu.txt" "$RUN_DIR/gpu.txt"
( while true; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader; sleep 5; done ) \
  > "$RUN_DIR/smi.log" 2>&1 &
SMI=$!
: > "$RUN_DIR/commands.txt"
for name in $(echo "${!CMD[@]}" | tr ' ' '\n' | sort); do
  echo "python -m bmoe_runtime.cli train --out $name.pt ${CMD[$name]}" >> "$RUN_DIR/commands.txt"
  ( date +%s > "$RUN_DIR/$name.start"
    timeout "$LIMIT" $PY -m bmoe_runtime.cli train --out "$RUN_DIR/$name.pt" ${CMD[$name]} > "$RUN_DIR/$name.log" 2>&1
    echo $? > "$RUN_DIR/$name.rc"; date +%s > "$RUN_DIR/$name.end" ) &
done
wait $(jobs -p | grep -v "^$SMI$") 2>/dev/null
for name in "${!CMD[@]}"; do while [ ! -f "$RUN_DIR/$name.end" ]; do sleep 1; done; done
kill $SMI 2>/dev/null
# tqdm redraws with \r: keep one line in 20 of its progress and every other line
for f in "$RUN_DIR"/*.log; do tr '\r' '\n' < "$f" | awk '/it\/s|s\/it|step\/s|s\/step/ {if (++k % 20) next} {print}' > "$f.txt"; done
tar czf "$OUT/logs.tgz" -C "$RUN_DIR" $(cd "$RUN_DIR" && ls *.log.txt *.rc *.start *.end smi.log commands.txt)
if [ "$MODE" = main ]; then
  $PY benchmarks/reproduce/dump_metrics.py "$RUN_DIR" "$OUT/results_$GROUP.json"
  [ -f "$RUN_DIR/default_model.pt" ] && $PY benchmarks/reproduce/dump_metrics.py --strip "$RUN_DIR/default_model.pt" "$OUT/default_model.pt" --sample "$OUT/default_model_sample.txt"
fi
ls -la "$OUT"
