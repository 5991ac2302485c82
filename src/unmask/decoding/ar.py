"""Autoregressive decoding with a KV cache, for the causal twin: the fair baseline for speed figures."""

from __future__ import annotations

import time
from typing import Callable

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import penalize, sample_tokens
from unmask.model.transformer import Transformer


@torch.no_grad()
def ar_generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    on_step: Callable[[StepEvent], None] | None = None,
    first_allowed: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> GenerationResult:
    """Greedy/sampled AR decoding. `on_step` gets one StepEvent per new token (the final one done=True);
    `first_allowed` (bool [vocab]) restricts the first new token (token healing)."""
    c = model.config
    if c.attention != "causal":
        raise ValueError(f"AR decoding needs a causal model, this one is {c.attention}")
    if not prompt_ids:
        raise ValueError("AR decoding needs at least one prompt token")
    total = len(prompt_ids) + max_new_tokens
    if total > c.max_seq_len:
        raise ValueError(f"prompt + new tokens = {total} exceeds the model context of {c.max_seq_len}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.output.weight.device
    t0 = time.perf_counter()
    cache = model.new_cache(1, total)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache, cache_start=0)
    if first_allowed is not None:
        logits[:, -1].masked_fill_(~first_allowed.to(device), float("-inf"))
    nfe, out, pos = 1, [], len(prompt_ids)
    finish = "length"
    counts = torch.zeros(logits.shape[-1], device=device)
    for _ in range(max_new_tokens):
        if presence_penalty or frequency_penalty:
            logits[:, -1] = penalize(logits[:, -1], counts, presence_penalty, frequency_penalty)
        tok, _ = sample_tokens(logits[:, -1], temperature, top_k, top_p, gen)
        counts[tok] += 1
        t = int(tok)
        if stop_at_eos and t == c.eos_id:
            finish = "eos"
            break
        out.append(t)
        if on_step is not None:
            on_step(StepEvent("0", len(out), list(out), len(out), changed=[len(out) - 1]))
        if len(out) == max_new_tokens:
            break
        logits = model(tok.view(1, 1), cache=cache, cache_start=pos)
        pos += 1
        nfe += 1
    result = GenerationResult(tokens=out, nfe=nfe, steps=nfe, seconds=time.perf_counter() - t0,
                              finish_reason=finish, prompt_tokens=len(prompt_ids))
    if on_step is not None:
        on_step(StepEvent("0", len(out), list(out), len(out), done=True, result=result))
    return result
