#!/usr/bin/env bash
# Equal-minutes comparison of the two ways to adapt SmolLM2-135M-Instruct to block diffusion (recipes/smollm2-block.yaml):
#   causal   causal attention inside blocks of 16, adapter only at [MASK] inputs (the recipe with model.block_size=16)
#   bidir    bidirectional attention inside blocks of 8 (Fast-dLLM v2), adapter on every token
# Both train at once for MINUTES with one thread each (the same CPU share), then decode held-out function
# prompts at thresholds 0.9 / 0.7: tokens per step, parse rate, and the AR base's bits per byte of what they wrote.
#   bash recipes/compare-adaptation.sh            # after `unmask corpus` and `unmask chat-data` (see the recipe)
set -euo pipefail
MINUTES=${MINUTES:-8}
UNMASK=${UNMASK:-.venv/bin/unmask}
COMMON=(-c recipes/smollm2-block.yaml --set "minutes=$MINUTES" --set eval_interval=0 --set checkpoint_interval=0)
OMP_NUM_THREADS=1 "$UNMASK" train "${COMMON[@]}" --set out_dir=runs/cmp-causal --set model.block_size=16 > runs/cmp-causal.log 2>&1 &
OMP_NUM_THREADS=1 "$UNMASK" train "${COMMON[@]}" --set out_dir=runs/cmp-bidir --set model.block_attention=bidirectional \
  --set model.adapter_tokens=all --set model.block_size=8 > runs/cmp-bidir.log 2>&1 &
wait
EVAL=(--data data/smollm2-code --ar-model smollm2 --steps "" --thresholds 0.9,0.7 --prompts 16 -n 64 --block-length 8
      --elbo-tokens 0)
"$UNMASK" eval speed-quality runs/cmp-causal "${EVAL[@]}" --threshold-policy leftmost --json runs/cmp-causal.json \
  --plot runs/cmp-causal.png
"$UNMASK" eval speed-quality runs/cmp-bidir "${EVAL[@]}" --json runs/cmp-bidir.json --plot runs/cmp-bidir.png
