"""Autoregressive decoding with a KV cache, for the causal twin: the fair baseline for speed figures, and
the batched answerer of sequence-level distillation (many prompts of different lengths, left-padded)."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import bias_vector, penalize, sample_tokens, token_logprobs
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
    logit_bias: dict[int, float] | None = None,
    logprobs: int | None = None,
) -> GenerationResult:
    """Greedy/sampled AR decoding. `on_step` gets one StepEvent per new token (the final one done=True);
    `first_allowed` (bool [vocab]) restricts the first new token (token healing)."""
    on_token = None
    if on_step is not None:
        def on_token(row: int, out: list[int]) -> None:
            on_step(StepEvent("0", len(out), list(out), len(out), changed=[len(out) - 1]))

    [result] = ar_generate_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos,
                                 first_allowed, presence_penalty, frequency_penalty, on_token, logit_bias, logprobs)
    if on_step is not None:
        on_step(StepEvent("0", len(result.tokens), list(result.tokens), len(result.tokens), done=True, result=result))
    return result


@torch.no_grad()
def ar_generate_batch(
    model: Transformer,
    prompts: Sequence[list[int]],
    max_new_tokens: int | Sequence[int] = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    first_allowed: torch.Tensor | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    on_token: Callable[[int, list[int]], None] | None = None,
    logit_bias: dict[int, float] | None = None,
    logprobs: int | None = None,
) -> list[GenerationResult]:
    """AR decoding of several prompts in one batch, each with its own budget (`max_new_tokens`: one for all
    or one per prompt). Prompts are left-padded: padding is invalid in the cache, and RoPE positions start
    at each prompt's first token, so a row computes what it would alone. A row that ends (EOS or budget)
    stops growing; the batch runs until every row has ended. `on_token(row, tokens)` after each new token.
    `logit_bias` ({token id: bias}) is added to the logits; `logprobs` (k) records each new token's
    log-probability under the model (before biases and penalties) and its k most likely alternatives.
    Results carry the batch's forward passes and wall time (shared by its rows)."""
    c = model.config
    if c.attention != "causal":
        raise ValueError(f"AR decoding needs a causal model, this one is {c.attention}")
    if not prompts or any(not p for p in prompts):
        raise ValueError("AR decoding needs at least one prompt token")
    B = len(prompts)
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != B:
        raise ValueError(f"{len(budgets)} budgets for {B} prompts")
    P = max(len(p) for p in prompts)
    for p, n in zip(prompts, budgets):
        if len(p) + n > c.max_seq_len:
            raise ValueError(f"prompt + new tokens = {len(p) + n} exceeds the model context of {c.max_seq_len}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.output.weight.device
    t0 = time.perf_counter()
    total = P + max(budgets)
    cache = model.new_cache(B, total)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)[:, None]
    slots = torch.arange(total, device=device)[None, :]
    cache.set_layout((slots - pad).clamp_min(0), slots >= pad)
    rows = torch.tensor([[c.eos_id] * (P - len(p)) + list(p) for p in prompts], device=device)
    logits = model(rows, cache=cache, cache_start=0)[:, -1]
    outs: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    live = [n > 0 for n in budgets]
    counts = torch.zeros(B, logits.shape[-1], device=device)
    bias = bias_vector(logit_bias or {}, logits.shape[-1], device)
    recorded: list[list] = [[] for _ in range(B)]
    nfe, pos = 1, P
    while any(live):
        model_logprobs = logits.float().log_softmax(-1) if logprobs is not None else None
        if first_allowed is not None and nfe == 1:
            logits = logits.masked_fill(~first_allowed.to(device), float("-inf"))
        if bias is not None:
            logits = logits + bias
        if presence_penalty or frequency_penalty:
            logits = penalize(logits, counts, presence_penalty, frequency_penalty)
        tok, _ = sample_tokens(logits, temperature, top_k, top_p, gen)
        counts.scatter_add_(1, tok[:, None], torch.ones(B, 1, device=device))
        entries = token_logprobs(model_logprobs, tok, logprobs) if model_logprobs is not None else None
        for b, t in enumerate(tok.tolist()):
            if not live[b]:
                continue
            if stop_at_eos and t == c.eos_id:
                finish[b], live[b] = "eos", False
                continue
            outs[b].append(t)
            if entries is not None:
                recorded[b].append(entries[b])
            if on_token is not None:
                on_token(b, outs[b])
            live[b] = len(outs[b]) < budgets[b]
        if not any(live):
            break
        logits = model(tok[:, None], cache=cache, cache_start=pos)[:, -1]
        pos += 1
        nfe += 1
    seconds = time.perf_counter() - t0
    results = [GenerationResult(tokens=out, nfe=nfe, steps=nfe, seconds=seconds, finish_reason=f,
                                prompt_tokens=len(p)) for out, f, p in zip(outs, finish, prompts)]
    if logprobs is not None:
        for result, entries in zip(results, recorded):
            result.logprobs = [lp for lp, _ in entries]
            result.top_logprobs = [top for _, top in entries]
    return results
