#!/usr/bin/env bash
# CPU precision table: ms per step and tokens/s in float32, bfloat16 and int8 weights (bf16 activations), for
# the default model against its AR base (the first 5 HumanEval prompts, 256 tokens each) and for the random
# 34M LLaDA-shaped model against its AR twin. Then how far each precision drifts from float32 (eval kl).
# Usage: bash recipes/precision.sh   (2 threads unless OMP_NUM_THREADS says otherwise)
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
unmask=${UNMASK:-unmask}
for precision in "--dtype float32" "--dtype bfloat16" "--dtype bfloat16 --quantize int8"; do
  echo "== default model, $precision"
  $unmask bench decode -m models/smollm2-block --ar-model smollm2 --prompts 5 -n 256 --block-length 12 \
    --policy verify --decoders policy,ar $precision
done
for precision in "--dtype float32" "--dtype bfloat16" "--dtype bfloat16 --quantize int8"; do
  echo "== random small-34m, $precision"
  $unmask bench decode --shape small-34m --compare ar --prompt-len 64 -n 128 --block-length 32 \
    --decoders none,dual,ar $precision
done
for precision in "--dtype bfloat16" "--dtype float32 --quantize int8" "--dtype bfloat16 --quantize int8" \
                 "--dtype bfloat16 --quantize fp8"; do
  echo "== drift of the default model, $precision"
  $unmask eval kl $precision
done
