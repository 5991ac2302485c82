"""Reference sampler: LLaDA-style semi-autoregressive masked-diffusion decoding (REFERENCE.md §2).

Deliberately plain — one full forward pass per step, no cache — so the fast engine can be checked
against it token for token. Any diffusion model: the model applies its own attention (bidirectional or
block-causal), and shifted-logit models (Dream, AR adaptations) come with their logits realigned.
"""

from __future__ import annotations

import time

import torch

from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import sample_tokens
from unmask.model.transformer import Transformer


def transfer_schedule(mask_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step [B, steps]: the mask count split evenly, remainder first."""
    base = mask_count[:, None] // steps
    rem = mask_count[:, None] % steps
    return base + (torch.arange(steps, device=mask_count.device)[None, :] < rem).long()


@torch.no_grad()
def reference_generate(
    model: Transformer,
    prompt: torch.Tensor,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    remasking: str = "low_confidence",
    seed: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Decode `gen_length` tokens after `prompt` [B, P]. Returns (sequences [B, P+gen], NFE)."""
    c = model.config
    steps = steps or gen_length
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise ValueError(f"steps {steps} must be a multiple of the number of blocks {n_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
    steps_per_block = steps // n_blocks
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), c.mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    nfe = 0
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        schedule = transfer_schedule((x[:, lo:hi] == c.mask_id).sum(1), steps_per_block)
        for s in range(steps_per_block):
            is_mask = x == c.mask_id
            logits = model(x)  # shifted-logit models (Dream) return them realigned to their positions
            nfe += 1
            x0, p = sample_tokens(logits, temperature, top_k, top_p, gen)
            if remasking == "random":
                p = torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.device)
            p[:, hi:] = float("-inf")
            conf = torch.where(is_mask, p, torch.full_like(p, float("-inf")))
            x0 = torch.where(is_mask, x0, x)
            for i in range(B):
                k = int(schedule[i, s])
                if k:
                    idx = torch.topk(conf[i], k).indices
                    x[i, idx] = x0[i, idx]
    return x, nfe


def truncate_at_eos(tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


def reference_result(model: Transformer, prompt_ids: list[int], **kw) -> GenerationResult:
    t0 = time.perf_counter()
    x, nfe = reference_generate(model, torch.tensor([prompt_ids], device=model.output.weight.device), **kw)
    tokens, hit_eos = truncate_at_eos(x[0, len(prompt_ids):].tolist(), model.config.eos_id)
    n_blocks = kw.get("gen_length", 128) // kw.get("block_length", 32)
    return GenerationResult(
        tokens=tokens, nfe=nfe, steps=nfe, steps_per_block=[nfe // n_blocks] * n_blocks,
        seconds=time.perf_counter() - t0, finish_reason="eos" if hit_eos else "length", prompt_tokens=len(prompt_ids),
    )
