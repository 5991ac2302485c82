"""Where a decoding step's time goes: torch.profiler over a few HumanEval completions, ops grouped by kind.

    OMP_NUM_THREADS=2 python recipes/profile-step.py                 # the default model (verify) and its AR base
    OMP_NUM_THREADS=2 python recipes/profile-step.py --quantize none # the same with dequantized weights

Prints, per step: wall time, then the ops' own time in linears (the quantized kernels, matmuls, LoRA),
attention, norms + RoPE + elementwise, sampling (softmax, argmax, top-k over the vocabulary), other ops,
and the rest of the wall time: Python and dispatch, which no kernel counts.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import unmask
from unmask.decoding.ar import ar_generate
from unmask.eval.humaneval import load_problems

KINDS = {
    "linears": ("_weight_int4pack_mm", "_weight_int8pack_mm", "aten::mm", "aten::addmm", "aten::linear",
                "_scaled_mm", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::baddbmm"),
    "sampling": ("softmax", "argmax", "topk", "sort", "log_softmax", "gather", "multinomial"),
    "norms, RoPE, elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::pow", "aten::mean", "aten::rsqrt",
                                 "aten::cat", "aten::silu", "aten::neg", "aten::cos", "aten::sin", "aten::div"),
}


def kind_of(op: str) -> str:
    return next((kind for kind, names in KINDS.items() if any(n in op for n in names)), "other ops")


def profile_run(run, steps_of) -> dict[str, float]:
    run()  # warm-up
    start = time.perf_counter()
    steps = steps_of(run())
    wall = (time.perf_counter() - start) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps = steps_of(run())
    spent = collections.Counter()
    for e in prof.key_averages():
        spent[kind_of(e.key)] += e.self_cpu_time_total / 1000 / steps
    ops = sum(spent.values())
    scale = wall / max(ops, wall)  # the profiler's own overhead inflates op times: scale them into the wall
    row = {k: v * scale for k, v in spent.items()}
    row["Python and dispatch"] = wall - ops * scale
    row["wall"] = wall
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", default="auto")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    pipe = unmask.load(quantize=args.quantize)
    base = unmask.load("smollm2", quantize=args.quantize)
    prompts = [pipe.encode(p["prompt"]) for p in load_problems(args.prompts)]
    n = args.new_tokens

    def ar():
        return [ar_generate(base.model, p, n, stop_at_eos=False) for p in prompts]

    def verify():
        return [pipe.generate(p, max_new_tokens=n, early_stop=False) for p in prompts]

    rows = {"AR step": profile_run(ar, lambda rs: sum(r.steps for r in rs)),
            "verify step": profile_run(verify, lambda rs: sum(r.steps for r in rs))}
    print(f"weights {pipe.config.quantization or 'dequantized'}, activations "
          f"{str(pipe.model.tok_embeddings.weight.dtype).removeprefix('torch.')} (AR base "
          f"{str(base.model.tok_embeddings.weight.dtype).removeprefix('torch.')}), {torch.get_num_threads()} threads, "
          f"ms per step")
    kinds = ["linears", "attention", "norms, RoPE, elementwise", "sampling", "other ops", "Python and dispatch", "wall"]
    print("| | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row.get(k, 0.0):.1f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
