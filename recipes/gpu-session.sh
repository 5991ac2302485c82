#!/usr/bin/env bash
# One GPU session (device tool, ~15 device-minutes) for the figures only a GPU gives: decode ms/step at the
# LLaDA-8B and Dream-7B shapes (issues #3, #6), training tokens/s, and the default model (issue #7) — its AR
# twin and two adaptation recipes at equal minutes. Runs from the repository root on a machine that has
# torch but no network and no install of unmask (PYTHONPATH=src).
#
#   bash recipes/gpu-session.sh bench     # decode + train benchmarks (GPU to itself), tables into $OUT
#   bash recipes/gpu-session.sh train     # starts in the background: AR twin, then recipe A and recipe B
#   bash recipes/gpu-session.sh collect   # waits for train, evaluates all three, winner's folder into $OUT
#   bash recipes/gpu-session.sh twin      # the AR twin's folder into $OUT (the device returns 8 files a call)
#   bash recipes/gpu-session.sh distill   # (more budget) background: trajectory distillation of the winner
#                                         #   (DISTILL_ANSWERS=twin: on the AR twin's answers, sequence-level)
#   bash recipes/gpu-session.sh student   # waits for distill, teacher vs student speed-quality, student into $OUT
#
# Chain the calls (the machine goes back ~30 s after a call). Data is built here and carried:
#   unmask corpus --recipe recipes/code-small.yaml --install
#   unmask shards data/code-small --out data/code-small-tokens
#   cp -r data/code-small/tokenizer data/code-small-tokens/
#   python <heldout snippet of models/code-small/MODEL_CARD.md>          # data/heldout-stdlib.jsonl
#   cp data/code-small/val.jsonl data/code-small-tokens/prompts.jsonl       # distillation prompts (not held out)
#   run(carry=["data/code-small-tokens", "data/heldout-stdlib.jsonl"], command="bash recipes/gpu-session.sh bench && bash recipes/gpu-session.sh train")
#
# Minutes: AR_MIN for the twin, ADAPT_MIN for each recipe (sequential, so each has the GPU to itself).
# A 15-minute session: AR_MIN=2.5 ADAPT_MIN=2 (train ~7.5 min with start-up and final validation), bench ~4,
# collect ~1.5, the machine's start ~2. BENCH_SHAPES and THRESHOLDS trim the benches and the evaluation;
# ENTROPY_BOUNDS sets the eb (EB-Sampler) rows of the teacher-vs-student comparison.
# SMOKE=1 rehearses every phase on the CPU with tiny shapes and seconds of training.
set -euo pipefail  # pipefail: a failed bench is seen through its tee

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
UNMASK=("$PYTHON" -m unmask.cli.main)
WORK=${WORK:-/tmp/unmask-gpu}
OUT=${OUT:-$WORK/out}
DATA=${DATA:-data/code-small-tokens}
PROMPTS=${PROMPTS:-data/heldout-stdlib.jsonl}
AR_MIN=${AR_MIN:-3}
ADAPT_MIN=${ADAPT_MIN:-2.5}
DISTILL_MIN=${DISTILL_MIN:-3}
# decoding of every quality evaluation and of the distillation teacher: greedy + frequency penalty, what
# the CPU default recommends (its parse rate 28 % sampled at T 0.9, 48 % greedy: MODEL_CARD.md)
read -ra DECODING <<< "${DECODING:---frequency-penalty 0.8}"
read -ra TEACHER_DECODING <<< "${TEACHER_DECODING:---teacher-frequency-penalty 0.8}"
mkdir -p "$WORK" "$OUT"

if [[ "${SMOKE:-0}" == 1 ]]; then  # same commands, tiny everything
  DEVICE=cpu; SHAPES=(tiny); N_PROMPTS=2; NEW=16; TEACHER_PROMPTS=4
  TRAIN_BENCH=(--shape tiny --batch-size 4 --steps 3 --warmup 1)
  SIZE=(--set model.shape=tiny --set batch_size=4 --set micro_batch_size=4 --set seq_len=64
        --set eval_sequences=4 --set eval_samples=1 --set compile=false --set optim.warmup_steps=4 --set device=cpu)
  BENCH=(--new-tokens 32 --prompt-len 16); COMPILE=()  # eager: compiling on the CPU costs a minute
else
  DEVICE=cuda; read -ra SHAPES <<< "${BENCH_SHAPES:-llada-8b dream-7b}"; N_PROMPTS=60; NEW=128; TEACHER_PROMPTS=2048
  TRAIN_BENCH=(--shape small-34m --batch-size 128 --seq-len 512 --compile)
  SIZE=(); BENCH=(--new-tokens 256 --prompt-len 64); COMPILE=(--compile)  # CUDA graphs (reduce-overhead)
fi
COMMON=(-c recipes/code-small.yaml --set data.corpus=null --set "data.train=$DATA/train.bin"
        --set "data.val=$DATA/val.bin" --set eval_interval=0 --set checkpoint_interval=0 "${SIZE[@]}")
ADAPT=(--set "init_from=$WORK/ar" --set model.logits_shift=true --set optim.warmup_steps=50 --set optim.lr=3e-4
       --set "minutes=$ADAPT_MIN")
[[ "${SMOKE:-0}" == 1 ]] && ADAPT+=(--set optim.warmup_steps=4)

bench() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true
  for shape in "${SHAPES[@]}"; do  # time-boxed: a compile that hangs must not eat the session
    COLUMNS=200 timeout "${BENCH_TIMEOUT:-300}" "${UNMASK[@]}" bench decode --shape "$shape" --device "$DEVICE" \
      "${BENCH[@]}" "${COMPILE[@]}" 2>&1 | tee "$OUT/bench-decode-$shape.txt" \
    || { echo "compiled bench failed: eager instead"
         COLUMNS=200 timeout "${BENCH_TIMEOUT:-300}" "${UNMASK[@]}" bench decode --shape "$shape" \
           --device "$DEVICE" "${BENCH[@]}" 2>&1 | tee -a "$OUT/bench-decode-$shape.txt"; }
  done
  COLUMNS=200 "${UNMASK[@]}" bench train "${TRAIN_BENCH[@]}" --device "$DEVICE" 2>&1 | tee "$OUT/bench-train.txt"
}

pipeline() {  # the twin first: both recipes adapt it (REFERENCE.md §4)
  "${UNMASK[@]}" train "${COMMON[@]}" --set mode=ar --set model.attention=causal --set "out_dir=$WORK/ar" \
    --set "data.tokenizer=$DATA/tokenizer" --set "minutes=$AR_MIN" --quiet
  # recipe A: bidirectional adaptation (LLaDA/Dream style); recipe B: block diffusion, 32-token blocks
  "${UNMASK[@]}" train "${COMMON[@]}" "${ADAPT[@]}" --set model.attention=bidirectional --set "out_dir=$WORK/bi" --quiet
  "${UNMASK[@]}" train "${COMMON[@]}" "${ADAPT[@]}" --set model.attention=block_causal --set model.block_size=32 \
    --set model.max_seq_len=1024 --set "out_dir=$WORK/bd" --quiet
}

train() {
  rm -f "$WORK/done" "$WORK/failed"
  setsid nohup bash -c "$(declare -p UNMASK COMMON ADAPT WORK DATA AR_MIN ADAPT_MIN); $(declare -f pipeline);
    if pipeline > '$WORK/train.log' 2>&1; then touch '$WORK/done'; else touch '$WORK/failed'; fi" \
    > /dev/null 2>&1 < /dev/null &
  echo "training in the background: $WORK/train.log"
}

wait_for_training() {
  local limit=${WAIT_S:-560} waited=0
  until [[ -e "$WORK/done" || -e "$WORK/failed" ]]; do
    (( waited >= limit )) && { echo "still training after ${limit}s"; tail -5 "$WORK/train.log"; return 1; }
    sleep 5; waited=$((waited + 5))
  done
  [[ -e "$WORK/failed" ]] && { tail -30 "$WORK/train.log"; return 1; }
  return 0
}

# copy a model folder into $OUT (weights are shards of <= 16 MiB: max_shard_mb in the recipe)
export_model() {
  rm -f "$OUT"/*.safetensors "$OUT"/model.safetensors.index.json
  cp "$1"/config.json "$1"/tokenizer.json "$1"/*.safetensors "$OUT"/
  [[ -e "$1/model.safetensors.index.json" ]] && cp "$1/model.safetensors.index.json" "$OUT"/
  ls -la "$OUT"
}

collect() {
  wait_for_training
  for run in ar bi bd; do  # the trainer's final validation: same windows, bits per byte
    printf '%s ' "$run"; grep '"val_bpb"' "$WORK/$run/log.jsonl" | tail -1
    grep '"planned_steps"' "$WORK/$run/log.jsonl" || true
  done | tee "$WORK/results.txt"
  COLUMNS=200 "${UNMASK[@]}" eval speed-quality "$WORK/bi" "$WORK/bd" "$WORK/ar" --data "$PROMPTS" \
    --ar-model "$WORK/ar" --steps "" --thresholds "${THRESHOLDS:-0.9,0.7}" -n "$NEW" --prompts "$N_PROMPTS" --elbo-tokens 0 \
    "${DECODING[@]}" --device "$DEVICE" \
    --plot "$WORK/speed-quality.png" --json "$WORK/speed-quality.json" 2>&1 | tee -a "$WORK/results.txt"
  # the winner: lower validation bits/byte of the two recipes (the samples are in the table for the card)
  winner=$("$PYTHON" - "$WORK" <<'EOF'
import json, sys
def bpb(run):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{run}/log.jsonl") if '"val_bpb"' in l]
    return rows[-1]["val_bpb"]
print(min(("bi", "bd"), key=bpb))
EOF
)
  echo "winner: $winner" | tee -a "$WORK/results.txt"
  echo "$winner" > "$WORK/winner"
  cp "$WORK/speed-quality.png" "$OUT"/  # + the model's 7 files: the device returns 8 (results: the log above)
  export_model "$WORK/$winner"
}

distill_run() {  # dParallel-style: the student learns the teacher's answers (DISTILL_ANSWERS=twin: the AR twin's)
  local answers=()
  [[ "${DISTILL_ANSWERS:-teacher}" == twin ]] && answers=(--answers-from "$WORK/ar")
  "${UNMASK[@]}" distill --teacher "$WORK/$(cat "$WORK/winner")" --out "$WORK/student" --method trajectory \
    --data "$DATA/prompts.jsonl" --prompts "$TEACHER_PROMPTS" "${TEACHER_DECODING[@]}" --answer-batch 128 "${answers[@]}" \
    --set "minutes=$DISTILL_MIN" --set device="$DEVICE" --set seq_len=128 --set batch_size=${DISTILL_BATCH:-64}
}

distill() {
  rm -f "$WORK/distilled" "$WORK/distill-failed"
  DISTILL_ANSWERS=${DISTILL_ANSWERS:-teacher}
  setsid nohup bash -c "$(declare -p UNMASK WORK DATA DISTILL_MIN TEACHER_PROMPTS DEVICE TEACHER_DECODING DISTILL_ANSWERS); $(declare -f distill_run);
    if distill_run > '$WORK/distill.log' 2>&1; then touch '$WORK/distilled'; else touch '$WORK/distill-failed'; fi" \
    > /dev/null 2>&1 < /dev/null &
  echo "distilling in the background: $WORK/distill.log"
}

student() {
  local waited=0
  until [[ -e "$WORK/distilled" || -e "$WORK/distill-failed" ]]; do
    (( waited >= ${WAIT_S:-560} )) && { echo "still distilling"; tail -5 "$WORK/distill.log"; return 1; }
    sleep 5; waited=$((waited + 5))
  done
  [[ -e "$WORK/distill-failed" ]] && { tail -30 "$WORK/distill.log"; return 1; }
  COLUMNS=200 "${UNMASK[@]}" eval speed-quality "$WORK/$(cat "$WORK/winner")" "$WORK/student" --data "$PROMPTS" \
    --ar-model "$WORK/ar" --steps "" --thresholds 0.9,0.7,0.5,0.3 --entropy-bounds "${ENTROPY_BOUNDS:-0.1,0.5,1}" \
    -n "$NEW" --prompts "$N_PROMPTS" --elbo-tokens 0 "${DECODING[@]}" --device "$DEVICE" \
    --plot "$WORK/distill-quality.png" --json "$WORK/distill-quality.json" 2>&1
  cp "$WORK/distill-quality.png" "$OUT"/
  export_model "$WORK/student"
}

case "${1:-}" in
  bench) bench ;;
  train) train ;;
  collect) collect ;;
  twin) wait_for_training && export_model "$WORK/ar" ;;
  distill) distill ;;
  student) student ;;
  *) echo "usage: bash recipes/gpu-session.sh bench|train|collect|twin|distill|student" >&2; exit 2 ;;
esac
