"""Token choice from logits: temperature, top-k, top-p, float64 Gumbel-max (as LLaDA), seeded."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus top-p to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (tokens, probability of each chosen token) for logits [..., V].

    temperature 0 is argmax. Otherwise Gumbel-max in float64: argmax(exp(l / T) / (-log u)) — the
    LLaDA formulation, whose float64 noise matters for low-temperature sampling of large vocabularies.
    """
    logits = filter_logits(logits.double(), top_k, top_p)
    probs = logits.softmax(-1)
    if temperature <= 0:
        tokens = logits.argmax(-1)
    else:
        # draw where the generator lives (a seeded CPU generator keeps results device-independent);
        # unseeded sampling on a GPU draws on the GPU and avoids a host->device copy every step
        device = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=device).to(logits.device)
        gumbel = (-torch.log(u.clamp_min(1e-300))) ** temperature
        tokens = (logits.exp() / gumbel).argmax(-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)
