"""Training objectives and likelihood bounds (REFERENCE.md §1).

masked diffusion  L = E_t[(1/t) * sum_{masked} -log p(x0_i | x_t)] / (B*L), t antithetic in [eps, 1]
SFT               prompt never masked; answer (incl. trailing EOS padding) masked; normalised by answer length
AR                next-token cross-entropy for the causal twin
block diffusion   the noised copy attends to itself inside its block and to the *clean* copy of earlier
                  blocks (input [x_t, x_0] of length 2L), exactly what the decoder sees at inference
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unmask.model.transformer import Transformer

EPS = 1e-3


def antithetic_t(n: int, eps: float = EPS, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Low-discrepancy t: t_i = ((u + i/n) mod 1) * (1 - eps) + eps, one u per batch."""
    u = torch.rand((), generator=generator)
    t = ((u + torch.arange(n) / n) % 1.0) * (1 - eps) + eps
    return t.to(device)


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each (maskable) token by mask_id with probability t (per row). Returns (x_t, masked)."""
    noise = torch.rand(x0.shape, generator=generator).to(x0.device)
    masked = noise < t[:, None]
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def block_diffusion_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """Mask [1, 1, 2L, 2L] for the input [x_t, x_0] (True = may attend)."""
    blk = torch.arange(length, device=device) // block_size
    q, k = blk[:, None], blk[None, :]
    noisy_noisy = q == k
    noisy_clean = k < q
    clean_clean = k <= q
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def denoiser_logits(model: Transformer, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Logits for predicting x0 from x_t, with clean block context for block-causal models."""
    c = model.config
    if c.attention != "block_causal":
        return model(x_t)
    B, L = x_t.shape
    positions = torch.arange(L, device=x_t.device).repeat(2).expand(B, -1)
    mask = block_diffusion_mask(L, c.block_size, device=x_t.device)
    x = torch.cat([x_t, x0], dim=1)
    if not c.logits_shift:
        return model(x, positions=positions, attn_mask=mask)[:, :L]
    # Shifted (AR-initialised) model: token i is read from output i-1. Inside a block that is the noisy
    # copy's output; for a block's first token it is the *clean* previous token's output, which is what the
    # decoder has at inference (the last committed token of the previous block).
    raw = model.output(model(x, positions=positions, attn_mask=mask, return_hidden=True))
    noisy, clean = raw[:, :L], raw[:, L:]
    prev = torch.cat([noisy[:, :1], noisy[:, :-1]], dim=1)
    prev_clean = torch.cat([clean[:, :1], clean[:, :-1]], dim=1)
    first = (torch.arange(L, device=x.device) % c.block_size == 0) & (torch.arange(L, device=x.device) > 0)
    return torch.where(first[None, :, None], prev_clean, prev)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token -log p in float32 [B, L]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_diffusion_loss(model: Transformer, x0: torch.Tensor, eps: float = EPS,
                          generator: torch.Generator | None = None, maskable: torch.Tensor | None = None) -> torch.Tensor:
    B, L = x0.shape
    t = antithetic_t(B, eps, generator, x0.device)
    x_t, masked = mask_tokens(x0, t, model.config.mask_id, generator, maskable)
    nll = token_nll(denoiser_logits(model, x_t, x0), x0)
    return (nll * masked / t[:, None]).sum() / (B * L)


def sft_loss(model: Transformer, x0: torch.Tensor, prompt_len: torch.Tensor, eps: float = EPS,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """x0 = prompt + answer + EOS padding; prompt_len [B]. Everything after the prompt is maskable."""
    B, L = x0.shape
    answer = torch.arange(L, device=x0.device)[None, :] >= prompt_len[:, None]
    t = antithetic_t(B, eps, generator, x0.device)
    x_t, masked = mask_tokens(x0, t, model.config.mask_id, generator, answer)
    nll = token_nll(denoiser_logits(model, x_t, x0), x0)
    answer_len = answer.sum(1).clamp(min=1)
    return ((nll * masked).sum(1) / t / answer_len).mean()


def ar_loss(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return token_nll(logits, x[:, 1:]).mean()


@torch.no_grad()
def sequence_nll(model: Transformer, x0: torch.Tensor, n_samples: int = 16,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Upper bound on -log p(x0) in nats, per sequence [B].

    causal         exact NLL of tokens 1..L-1 given token 0
    bidirectional  LLaDA's estimator: l ~ U{1..L}, mask exactly l tokens, weight L/l, averaged over samples
    block_causal   the t-form bound E_t[(1/t) sum_masked nll] with clean earlier blocks
    """
    B, L = x0.shape
    c = model.config
    if c.attention == "causal":
        return token_nll(model(x0[:, :-1]), x0[:, 1:]).sum(1)
    total = torch.zeros(B, device=x0.device)
    for _ in range(n_samples):
        if c.attention == "block_causal":
            t = torch.rand(B, generator=generator).to(x0.device) * (1 - EPS) + EPS
            x_t, masked = mask_tokens(x0, t, c.mask_id, generator)
            weight = 1.0 / t[:, None]
        else:
            l = torch.randint(1, L + 1, (B,), generator=generator).to(x0.device)
            ranks = torch.rand(B, L, generator=generator).to(x0.device).argsort(1).argsort(1)
            masked = ranks < l[:, None]
            x_t = torch.where(masked, torch.full_like(x0, c.mask_id), x0)
            weight = (L / l.float())[:, None]
        nll = token_nll(denoiser_logits(model, x_t, x0), x0)
        total += (nll * masked * weight).sum(1)
    return total / n_samples


@torch.no_grad()
def continuation_nll(model, prefix: Sequence[int], target: Sequence[int], mc_samples: int = 32,
                     batch_size: int = 16, generator: torch.Generator | None = None) -> float:
    """Upper bound on -log p(target | prefix) in nats (exact for causal models): LLaDA's Monte-Carlo ELBO
    with only the target masked (l ~ U{1..L} of its L tokens, weight L/l, l stratified over the samples);
    block-diffusion models in the block form. The lm-eval adapter's loglikelihood and the edit length
    search both score with it."""
    c = model.config
    device = model.output.weight.device
    L = len(target)
    if L == 0:
        return 0.0
    seq = torch.tensor([list(prefix) + list(target)], device=device)
    P = len(prefix)
    if c.attention == "causal":
        if P == 0:
            raise ValueError("a causal model needs at least one context token to score the continuation")
        return token_nll(model(seq[:, :-1])[:, P - 1 :], seq[:, P:]).sum().item()
    u = torch.rand((), generator=generator).item()
    # stratified number of masked tokens: marginally uniform on 1..L, spread evenly over the samples
    n_masked = (((u + torch.arange(mc_samples) / mc_samples) % 1.0) * L).long() + 1
    total = 0.0
    for lo in range(0, mc_samples, batch_size):
        l = n_masked[lo : lo + batch_size].to(device)
        B = l.shape[0]
        ranks = torch.rand(B, L, generator=generator).argsort(1).argsort(1).to(device)
        masked = torch.zeros(B, P + L, dtype=torch.bool, device=device)
        masked[:, P:] = ranks < l[:, None]
        x0 = seq.expand(B, -1)
        x_t = torch.where(masked, torch.full_like(x0, c.mask_id), x0)
        nll = token_nll(denoiser_logits(model, x_t, x0), x0)
        total += ((nll * masked).sum(1) * (L / l.float())).sum().item()
    return total / mc_samples


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (math.log(2) * max(n_bytes, 1))
