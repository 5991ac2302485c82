"""Training objectives and likelihood bounds (REFERENCE.md §1).

masked diffusion  L = E_t[(1/t) * sum_{masked} -log p(x0_i | x_t)] / (B*L), t antithetic in [eps, 1]
SFT               prompt never masked; answer (incl. trailing EOS padding) masked; normalised by answer length
AR                next-token cross-entropy for the causal twin
block diffusion   the noised copy attends to itself inside its block and to the *clean* copy of earlier
                  blocks (input [x_t, x_0] of length 2L), exactly what the decoder sees at inference
adaptation        an AR model learning block diffusion: decoder-like masks (a block's tail masked after a
                  random cut, or each token masked with probability t), mean cross-entropy of the masked tokens
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unmask.decoding.layout import layout_for
from unmask.model.adapter import is_adapter_param
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


def block_diffusion_mask(length: int, block_size: int, device=None, causal_inside: bool = False) -> torch.Tensor:
    """Mask [1, 1, 2L, 2L] for the input [x_t, x_0] (True = may attend). `causal_inside`: a noisy token sees
    only the noisy tokens of its block up to itself (block_attention "causal")."""
    idx = torch.arange(length, device=device)
    blk = idx // block_size
    q, k = blk[:, None], blk[None, :]
    noisy_noisy = q == k
    if causal_inside:
        noisy_noisy = noisy_noisy & (idx[None, :] <= idx[:, None])
    noisy_clean = k < q
    clean_clean = k <= q
    top = torch.cat([noisy_noisy, noisy_clean], dim=1)
    bottom = torch.cat([torch.zeros_like(clean_clean), clean_clean], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


class CleanContext:
    """Duck-types KVCache for a pass of x_t over the K/V of x_0 computed beforehand without gradients: each
    layer's keys are [this call's, clean], concatenated rather than written in place, so autograd sees them."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], positions: torch.Tensor):
        self.k_clean, self.v_clean = k, v
        self.positions = positions.repeat(1, 2)
        self.valid = torch.ones_like(self.positions, dtype=torch.bool)
        self.k, self.v = k[0], v[0]  # the Transformer reads the buffers' dtype

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # slots in the order of the [x_t, x_0] mask: this call's (noisy) first, then the clean copy
        return torch.cat([k, self.k_clean[layer]], dim=2), torch.cat([v, self.v_clean[layer]], dim=2)


def _clean_half_frozen(model: Transformer) -> bool:
    """True when nothing trainable acts on the clean copy x_0: the adapter is gated to [MASK] inputs (x_0 has
    none) and every base weight is frozen. Then x_0 needs no gradients and is computed once, cheaply."""
    c = model.config
    return (torch.is_grad_enabled() and c.adapter_rank > 0 and c.adapter_tokens == "masks"
            and not any(p.requires_grad for n, p in model.named_parameters() if not is_adapter_param(n)))


def block_hidden(model: Transformer, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, 2L, dim] of a block_causal model on [x_t, x_0]."""
    c = model.config
    B, L = x_t.shape
    positions = torch.arange(L, device=x_t.device).repeat(2).expand(B, -1)
    mask = block_diffusion_mask(L, c.block_size, device=x_t.device, causal_inside=c.block_attention == "causal")
    if not _clean_half_frozen(model):
        return model(torch.cat([x_t, x0], dim=1), positions=positions, attn_mask=mask, return_hidden=True)
    # the clean copy attends only to itself: run it alone, without gradients, and keep its K/V
    with torch.no_grad():
        cache = model.new_cache(B, L, dtype=torch.get_autocast_dtype("cpu" if x0.device.type == "cpu" else "cuda")
                                if torch.is_autocast_enabled(x0.device.type) else None)
        clean = model(x0, positions=positions[:, :L], cache=cache, attn_mask=mask[..., L:, L:], return_hidden=True)
        context = CleanContext(list(cache.k), list(cache.v), positions[:, :L])
    noisy = model(x_t, positions=positions[:, :L], cache=context, cache_start=L, kv_len=2 * L,
                  attn_mask=mask[..., :L, :], return_hidden=True)
    return torch.cat([noisy, clean], dim=1)


def logit_sources(config, L: int, device=None) -> torch.Tensor:
    """For each position i of x_t, the row of the [x_t, x_0] hidden states its logits are read from.
    Shifted (AR-initialised) models read token i from output i-1: inside a block that is the noisy copy's
    output; for a block's first token it is the *clean* previous token's output, which is what the decoder
    has at inference (the last committed token of the previous block)."""
    i = torch.arange(L, device=device)
    if not config.logits_shift:
        return i
    first = (i % config.block_size == 0) & (i > 0)
    return torch.where(first, L + i - 1, (i - 1).clamp_min(0))


def denoiser_logits(model: Transformer, x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Logits for predicting x0 from x_t, with clean block context for block-causal models."""
    c = model.config
    if not layout_for(c).block_causal:
        return model(x_t)
    hidden = block_hidden(model, x_t, x0)
    return model.output(hidden[:, logit_sources(c, x_t.shape[1], x_t.device)])


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


def decoder_like_masks(x0: torch.Tensor, block_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Masks [B, L] shaped like a block decoder's canvases: even rows mask each block's tail after a random
    cut (what left-to-right threshold decoding sees), odd rows mask each token with probability t ~ U(0, 1)
    (tokens committed out of order). Every block keeps at least one mask."""
    B, L = x0.shape
    pos = torch.arange(L) % block_size
    n_blocks = -(-L // block_size)
    cut = torch.randint(0, block_size, (B, n_blocks), generator=generator).repeat_interleave(block_size, 1)[:, :L]
    tail = pos[None, :] >= cut
    t = torch.rand(B, 1, generator=generator)
    scattered = torch.rand(B, L, generator=generator) < t
    scattered |= pos[None, :] == cut  # at least the token at the cut
    rows = torch.arange(B)[:, None] % 2 == 0
    return torch.where(rows, tail, scattered).to(x0.device)


def adaptation_loss(model: Transformer, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean cross-entropy of the masked tokens of decoder-like canvases (a block_causal model). Only the
    masked positions' logits are computed: the vocabulary projection is a large share of a small model."""
    c = model.config
    masked = decoder_like_masks(x0, c.block_size, generator)
    x_t = torch.where(masked, torch.full_like(x0, c.mask_id), x0)
    hidden = block_hidden(model, x_t, x0)
    rows, cols = masked.nonzero(as_tuple=True)
    src = logit_sources(c, x0.shape[1], x0.device)[cols]
    logits = model.output(hidden[rows, src])
    return F.cross_entropy(logits.float(), x0[rows, cols])


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
    c, layout = model.config, layout_for(model.config)
    if not layout.diffusion:
        return token_nll(model(x0[:, :-1]), x0[:, 1:]).sum(1)
    total = torch.zeros(B, device=x0.device)
    for _ in range(n_samples):
        if layout.block_causal:
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
    if not layout_for(c).diffusion:
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
