"""`denoise`: fill every [MASK] of a canvas, leaving all other tokens as context.

This is the primitive under generation (prompt + masks), infilling (prefix + masks + suffix) and
Instant Edit (masks wherever the text changes). Masked positions are decoded in blocks of
`block_length` masked positions, left to right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.decoding.reference import transfer_schedule
from unmask.decoding.sampling import sample_tokens
from unmask.model.transformer import Transformer


@dataclass
class DenoiseOutput:
    canvas: list[int]
    nfe: int = 0
    steps: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    seconds: float = 0.0
    stopped_at_eos: bool = False


@torch.no_grad()
def denoise(
    model: Transformer,
    canvas: Sequence[int],
    options: DecodeOptions,
    on_step: Callable[[StepEvent], None] | None = None,
    request_id: str = "0",
) -> DenoiseOutput:
    c = model.config
    t0 = time.perf_counter()
    device = model.output.weight.device
    x = torch.tensor([list(canvas)], device=device)
    mask_pos = (x[0] == c.mask_id).nonzero().flatten().tolist()
    blocks = [mask_pos[i : i + options.block_length] for i in range(0, len(mask_pos), options.block_length)]
    gen = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    total_steps = options.steps or len(mask_pos)
    steps_per_block_budget = max(1, -(-total_steps // max(len(blocks), 1)))
    out = DenoiseOutput(canvas=list(canvas))
    trailing = mask_pos and mask_pos[-1] == x.shape[1] - 1
    for bi, block in enumerate(blocks):
        idx = torch.tensor(block, device=device)
        schedule = transfer_schedule(torch.tensor([len(block)]), steps_per_block_budget)[0]
        steps = 0
        while bool((x[0, idx] == c.mask_id).any()):
            logits = model(x)
            out.nfe += 1
            tokens, prob = sample_tokens(logits[0, idx], options.temperature, options.top_k, options.top_p, gen)
            still = x[0, idx] == c.mask_id
            conf = torch.where(still, prob, torch.full_like(prob, -1.0))
            if options.policy == "threshold":
                commit = still & (conf >= options.threshold)
                commit[conf.argmax()] = True
            else:  # fixed steps, low-confidence remasking
                k = int(schedule[min(steps, len(schedule) - 1)]) or 1
                k = min(k, int(still.sum()))
                commit = torch.zeros_like(still)
                commit[torch.topk(conf, k).indices] = True
            x[0, idx[commit]] = tokens[commit]
            steps += 1
            if on_step is not None:
                row = x[0].tolist()
                on_step(StepEvent(request_id, out.steps + steps, row, sum(t != c.mask_id for t in row),
                                  changed=idx[commit].tolist()))
        out.steps += steps
        out.steps_per_block.append(steps)
        # early stop: a finished block of the trailing masked run holds EOS -> everything after is EOS
        if options.early_stop and trailing and bool((x[0, idx] == c.eos_id).any()) and bi < len(blocks) - 1:
            rest = torch.tensor([p for b in blocks[bi + 1 :] for p in b], device=device)
            x[0, rest] = c.eos_id
            out.stopped_at_eos = True
            break
    out.canvas = x[0].tolist()
    out.seconds = time.perf_counter() - t0
    return out
