#!/usr/bin/env bash
# GPU check of the trainer's speed options (issue 13): --cuda-graphs and --compile. One H200, about 5 minutes.
#
#   PYTHONPATH=$PWD bash benchmarks/gpu_check_training.sh      # from the repository root, $OUT set
#
# Needs .data/tinyshakespeare/input.txt (a copy of ../shared/data; .data/ is git-ignored and carried along).
# Parts, each with a deadline so the whole stays within $BUDGET seconds (default 300):
#   1. at the same time (correctness only, nothing timed): the GPU tests of the new path; the resume runs
#      (bmoe-train stopped with --stop-at and resumed, against uninterrupted runs, eager and graphed, and
#      checkpoints of one mode resumed in the other; a control resumed with another router-noise RNG state);
#      a first torch.compile of every benchmark shape, one process per shape (cold compile times, under load;
#      it also fills the compile cache part 3 reads)
#   2. alone: bmoe-train end to end, ButterflyMoE d512/4 layers/N=64, BPE 8192, 300 steps: eager vs graphed
#   3. alone: benchmarks/train_throughput.py, modes fused (eager), graphed, compiled, compiled-graphed at
#      the five issue-13 shapes, until the time left runs out
#   4. the numbers that decide the defaults (docs/training.md, "Speed options")
# Writes to $OUT: summary.txt (this script's output, the decision numbers at the end), pytest.txt,
# throughput.json, compile_cold.json, train_runs.json (resume gaps, end-to-end tokens/s), logs.txt.
# On a machine without CUDA, DEVICE=cpu MODES=eager RESUME_ARGS=... SPEED_ARGS=... run the logic of parts 1,
# 2 and 4 (the CPU resume is bit-exact: every gap 0).
set -uo pipefail
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
: "${OUT:?set OUT to the folder for the results}"
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-$PWD/.data}
BUDGET=${BUDGET:-300}
MODES=${MODES:-eager graphed}
RESUME_ARGS=${RESUME_ARGS:---preset paper --tokenizer byte --steps 60 --eval-every 30 --log-every 1}
STOP=${STOP:-30}
SPEED_ARGS=${SPEED_ARGS:---preset paper --experts 64 --tokenizer bpe --bpe-vocab 8192 --steps 300 --eval-every 100000 --log-every 100}
SHAPES="butterfly-d512-N64 dense-d512-N8 butterfly-d512-N8 butterfly-d512-N256 butterfly-d1024-N64"
CORPUS=$DATA/tinyshakespeare/input.txt

mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
TEE=$!
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
export BMOE_CACHE_DIR=$W/cache BMOE_DATA=$DATA
T0=$SECONDS
say() { echo "[$((SECONDS - T0)) s] $*"; }
# run "$@" until T0 + $1 seconds at the latest (exit 124 past it)
until_() {
  local left=$((T0 + $1 - SECONDS)); shift
  if ((left < 1)); then echo "not run (no time left): $*"; return 124; fi
  timeout "$left" "$@"
}
PIDS=()
wait_all() { wait "${PIDS[@]}"; PIDS=(); }  # a bare `wait` would also wait for the tee above: forever
flag() { [ "$1" = graphed ] && echo --cuda-graphs || echo --no-cuda-graphs; }
TRAIN=("$PY" -m bmoe_runtime.cli train --device "$DEVICE")  # bmoe-train, without installing the repository

[ -f "$CORPUS" ] || { echo "no corpus at $CORPUS (copy ../shared/data/tinyshakespeare into $DATA)"; exit 2; }
say "gpu_check_training: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'), device $DEVICE, modes: $MODES"
git log -1 --format='commit %h %s' 2>/dev/null

# ---- 1. correctness, concurrently ----------------------------------------------------------------------
P1=120
say "part 1: GPU tests, resume runs and cold compiles, concurrently (deadline ${P1} s)"
(until_ $P1 "$PY" -m pytest tests/test_train_speed_options.py -vv -rs -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
 echo $? > "$W/pytest.rc") &
PIDS+=($!)

resume_lane() {  # one step mode: two uninterrupted runs, one stopped at $STOP and resumed
  local m=$1 f; f=$(flag "$1")
  for run in full full2; do
    until_ $P1 "${TRAIN[@]}" $RESUME_ARGS --data "$CORPUS" $f --out "$W/$m-$run.pt" || return
  done
  until_ $P1 "${TRAIN[@]}" $RESUME_ARGS --data "$CORPUS" $f --out "$W/$m-part.pt" --stop-at "$STOP" || return
  cp "$W/$m-part.pt" "$W/$m-stopped.pt"
  until_ $P1 "${TRAIN[@]}" $RESUME_ARGS --data "$CORPUS" $f --out "$W/$m-part.pt" --resume
}
for m in $MODES; do resume_lane "$m" > "$W/lane-$m.log" 2>&1 & PIDS+=($!); done

if [ "$DEVICE" = cuda ]; then  # niced: the tests and resume runs come first
  for s in $SHAPES; do
    until_ $P1 nice -n 10 "$PY" benchmarks/train_throughput.py --only "$s" --modes compiled compiled-graphed --warmup 1 \
      --steps 3 --out "$W/cold-$s.json" > "$W/cold-$s.log" 2>&1 &
    PIDS+=($!)
  done
fi
wait_all

# checkpoints of one mode resumed in the other (both lanes done), and a control: the last mode's checkpoint
# resumed with another router-noise RNG state (how far a resume that lost the RNG state would drift)
resume_copy() {  # mode of the checkpoint, mode to resume in, name of the copy
  cp "$W/$1-stopped.pt" "$W/$3.pt" 2>/dev/null || return
  if [ "$3" = control ]; then
    "$PY" - "$W/control.pt" <<'PY' || return
import sys, torch
from bmoe_runtime.train.checkpoint import read_checkpoint, write_checkpoint
ckpt = read_checkpoint(sys.argv[1])
rng = ckpt["train_state"]["rng"]
if rng["cuda"][0] is not None:  # CUDA state: seed (8 bytes) and offset; another seed
    rng["cuda"][0] = torch.cat([torch.tensor([12345], dtype=torch.int64).view(torch.uint8), rng["cuda"][0][8:]])
else:
    rng["cpu"][0] = torch.Generator().manual_seed(12345).get_state()
write_checkpoint(sys.argv[1], ckpt)  # under a fresh checksum
PY
  fi
  until_ $((P1 + 25)) "${TRAIN[@]}" $RESUME_ARGS --data "$CORPUS" $(flag "$2") --out "$W/$3.pt" --resume
}
say "part 1: cross-mode resumes and the RNG control"
if [[ " $MODES " == *" eager "* && " $MODES " == *" graphed "* ]]; then
  resume_copy graphed eager graphed-then-eager > "$W/cross-graphed-eager.log" 2>&1 & PIDS+=($!)
  resume_copy eager graphed eager-then-graphed > "$W/cross-eager-graphed.log" 2>&1 & PIDS+=($!)
fi
CTRL=${MODES##* }
resume_copy "$CTRL" "$CTRL" control > "$W/control.log" 2>&1 & PIDS+=($!)
wait_all
say "part 1 done: pytest exit $(cat "$W/pytest.rc" 2>/dev/null || echo '?'): $(tail -n 1 "$OUT/pytest.txt")"

# ---- 2. the trainer end to end, alone -------------------------------------------------------------------
P2=$((SECONDS - T0 + 60))
say "part 2: bmoe-train end to end ($SPEED_ARGS), deadline ${P2} s"
for m in $MODES; do
  until_ $P2 "${TRAIN[@]}" $SPEED_ARGS --data "$CORPUS" $(flag "$m") --out "$W/speed-$m.pt" > "$W/speed-$m.log" 2>&1
  say "  $m: $(grep -h '^done:\|^Error' "$W/speed-$m.log" | tail -n 1)"
done

# ---- 3. the step alone, per shape and mode -------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  TB=$((BUDGET - (SECONDS - T0) - 30))  # the last measurement started may take ~20 s (a compiled d1024)
  say "part 3: train_throughput.py, no measurement started after ${TB} s"
  until_ $((BUDGET + 5)) "$PY" benchmarks/train_throughput.py --only $SHAPES \
    --modes fused graphed compiled compiled-graphed --warmup 5 --steps 20 --time-budget "$TB" \
    --out "$OUT/throughput.json"
fi

# ---- 4. results -----------------------------------------------------------------------------------------
for f in "$W"/lane-*.log "$W"/cross-*.log "$W"/control.log "$W"/speed-*.log "$W"/cold-*.log; do
  [ -f "$f" ] && { echo "==== $(basename "$f")"; cat "$f"; }
done > "$OUT/logs.txt"
say "part 4: results"
"$PY" - "$W" "$OUT" "$MODES" "$STOP" "$(cat "$W/pytest.rc" 2>/dev/null || echo 1)" <<'PY'
import functools, glob, json, os, sys
from bmoe_runtime.train.checkpoint import read_checkpoint

w, out, modes, stop, pytest_rc = sys.argv[1], sys.argv[2], sys.argv[3].split(), int(sys.argv[4]), int(sys.argv[5])


@functools.cache  # the uninterrupted runs are compared several times: read (and checksum) each once
def metrics(name):
    path = f"{w}/{name}.pt"
    return read_checkpoint(path)["metrics"] if os.path.exists(path) else None


def gaps(a, b):
    """Largest |Δ loss| over the logged steps up to the stop and after it; None where a run is missing."""
    ma, mb = metrics(a), metrics(b)
    if not ma or not mb or "train_curve" not in ma or "train_curve" not in mb:
        return None
    ca, cb = dict(map(tuple, ma["train_curve"])), dict(map(tuple, mb["train_curve"]))
    if sorted(ca) != sorted(cb):
        return {"error": f"logged steps differ: {len(ca)} vs {len(cb)}"}
    before = [abs(ca[s] - cb[s]) for s in ca if s <= stop]
    after = [abs(ca[s] - cb[s]) for s in ca if s > stop]
    return {"steps": len(ca), "max_abs_before_stop": max(before, default=0.0), "max_abs_after_stop": max(after, default=0.0)}


runs = {"rule": "a resumed run is within GPU nondeterminism when its largest |Δ loss| after the stop is at most "
                "max(3 × the largest |Δ| between two uninterrupted runs of either mode, 2e-3 nats)",
        "stop_at": stop, "modes": {}, "cross": {}, "end_to_end": {}}
for m in modes:
    runs["modes"][m] = {"resumed_vs_uninterrupted": gaps(f"{m}-part", f"{m}-full"),
                        "uninterrupted_vs_uninterrupted": gaps(f"{m}-full2", f"{m}-full")}
if {"eager", "graphed"} <= set(modes):
    runs["cross"] = {"graphed_then_eager_vs_graphed": gaps("graphed-then-eager", "graphed-full"),
                     "eager_then_graphed_vs_eager": gaps("eager-then-graphed", "eager-full"),
                     "graphed_vs_eager_uninterrupted": gaps("graphed-full", "eager-full")}
ctrl = modes[-1]
runs["control_other_rng_vs_uninterrupted"] = {"mode": ctrl, **(gaps("control", f"{ctrl}-full") or {})}
noise = [max(g["max_abs_before_stop"], g["max_abs_after_stop"]) for g in
         (runs["modes"][m]["uninterrupted_vs_uninterrupted"] for m in modes) if g and "error" not in g]
limit = max([3 * max(noise, default=0.0), 2e-3])
checked = [runs["modes"][m]["resumed_vs_uninterrupted"] for m in modes]
checked += [runs["cross"][k] for k in ("graphed_then_eager_vs_graphed", "eager_then_graphed_vs_eager")
            if k in runs["cross"]]
runs["resume_within_nondeterminism"] = all(g and "error" not in g and g["max_abs_after_stop"] <= limit for g in checked)
runs["resume_bit_exact"] = all(g and "error" not in g and g["max_abs_after_stop"] == 0 for g in checked)
for m in modes:
    mt = metrics(f"speed-{m}")
    runs["end_to_end"][m] = None if not mt else {
        "steady_tokens_per_s": mt.get("steady_tokens_per_s"), "valid_loss": mt["valid"]["loss"],
        "peak_gpu_gib": (mt.get("peak_gpu_bytes_rank0") or 0) / 2**30,
        "peak_gpu_reserved_gib": (mt.get("peak_gpu_reserved_bytes_rank0") or 0) / 2**30,
        "cuda_graphs": mt.get("cuda_graphs")}
cold = {"note": "first torch.compile in a fresh process, 5 such processes and the checks of part 1 running at once",
        "results": [r for f in sorted(glob.glob(f"{w}/cold-*.json")) for r in json.load(open(f))["results"]]}
if cold["results"]:
    json.dump(cold, open(f"{out}/compile_cold.json", "w"), indent=1)
json.dump(runs, open(f"{out}/train_runs.json", "w"), indent=1)
print(json.dumps(runs, indent=1))

# the numbers that decide the defaults (docs/training.md, "Speed options")
tp = json.load(open(f"{out}/throughput.json")) if os.path.exists(f"{out}/throughput.json") else {"results": []}
res = {(r["shape"], r["mode"]): r for r in tp["results"]}
shapes = sorted({s for s, _ in res}, key=lambda s: [r["shape"] for r in tp["results"]].index(s))
print("\nshape                  graphed/fused  reserved  compiled/fused  compiled-graphed/graphed  cold compile s")
for s in shapes:
    def ratio(a, b, key="tokens_per_s"):
        return res[(s, a)][key] / res[(s, b)][key] if (s, a) in res and (s, b) in res else float("nan")
    c = [r["warmup_s"] for r in cold["results"] if r["shape"] == s and r["mode"] == "compiled"]
    print(f"{s:22s} {ratio('graphed', 'fused'):13.2f}× {ratio('graphed', 'fused', 'peak_reserved_gib'):8.2f}× "
          f"{ratio('compiled', 'fused'):14.2f}× {ratio('compiled-graphed', 'graphed'):24.2f}× "
          f"{c[0] if c else float('nan'):14.1f}")
tests = open(f"{out}/pytest.txt").read() if os.path.exists(f"{out}/pytest.txt") else ""
print(f"\nGPU tests: exit {pytest_rc}; {tests.strip().splitlines()[-1] if tests.strip() else 'no output'}")
print(f"resume within nondeterminism: {runs['resume_within_nondeterminism']} (limit {limit:.2e} nats); "
      f"bit-exact: {runs['resume_bit_exact']}; control (resumed with another RNG state), after the stop: "
      f"{runs['control_other_rng_vs_uninterrupted'].get('max_abs_after_stop')}")
e2e = runs["end_to_end"]
if e2e.get("eager") and e2e.get("graphed") and e2e["eager"]["steady_tokens_per_s"]:
    print(f"bmoe-train end to end: eager {e2e['eager']['steady_tokens_per_s']:,.0f}, graphed "
          f"{e2e['graphed']['steady_tokens_per_s']:,.0f} tokens/s "
          f"({e2e['graphed']['steady_tokens_per_s'] / e2e['eager']['steady_tokens_per_s']:.2f}×)")
if tp.get("skipped") or tp.get("failed"):
    print(f"throughput: skipped {tp.get('skipped')}, failed {tp.get('failed')}")
PY
say "done; wrote $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE"  # summary.txt complete before the script returns
