"""Token choice from logits: temperature, then top-k / top-p, float64 Gumbel-max (as LLaDA), seeded."""

from __future__ import annotations

import torch

NUCLEUS_FIRST_K = 64  # candidates top-p looks at first; it widens only while the nucleus may be larger


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus top-p to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        logits = logits.masked_fill(~nucleus(logits, top_p), float("-inf"))
    return logits


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [..., V]: the smallest set of most probable tokens whose mass reaches top_p (the token that
    crosses top_p included). A full sort of a vocabulary per position costs more than a forward pass on a
    CPU, so peaked rows are settled by one small top-k and flat ones (a small model's nucleus at top-p 0.95
    holds a third of its vocabulary) by probability buckets: exact, with no sort of the vocabulary."""
    probs = logits.softmax(-1)
    k = min(NUCLEUS_FIRST_K, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)  # sorted, most probable first
    cum = top.cumsum(-1)
    if k == probs.shape[-1] or bool((cum[..., -1] >= top_p).all()):
        return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (cum - top) < top_p)
    return _bucketed_nucleus(probs.reshape(-1, probs.shape[-1]), top_p).reshape(probs.shape)


BUCKETS_PER_OCTAVE = 16
N_BUCKETS = 64 * BUCKETS_PER_OCTAVE  # the last bucket takes everything below 2^-64


def _bucketed_nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """nucleus() for probabilities [R, V]. Bucket i holds probabilities in (2^-(i+1)/16, 2^-i/16], so bucket
    order is probability order: whole buckets before the one that crosses top_p are in, and only that edge
    bucket's few tokens are sorted to find where the mass is reached."""
    bucket = (-torch.log2(p) * BUCKETS_PER_OCTAVE).floor_().clamp_(0, N_BUCKETS - 1).long()
    mass = torch.zeros(p.shape[0], N_BUCKETS, dtype=p.dtype, device=p.device).scatter_add_(1, bucket, p)
    cum = mass.cumsum(1)
    edge = (cum < top_p).sum(1, keepdim=True).clamp_max(N_BUCKETS - 1)
    before = cum.gather(1, edge) - mass.gather(1, edge)  # mass of the buckets above the edge
    in_edge = bucket == edge
    top, order = p.masked_fill(~in_edge, -1.0).topk(int(in_edge.sum(1).max()), dim=1)
    keep = (before + top.cumsum(1) - top < top_p) & (top >= 0)  # -1.0: rows with fewer edge tokens
    return (bucket < edge) | torch.zeros_like(in_edge).scatter_(1, order, keep)


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties: logits [..., V] minus presence * [count > 0] + frequency * count,
    with counts [V] (or broadcastable) of the tokens generated so far."""
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def decision_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """The logits a token is chosen from: divided by the temperature (T > 0) first, then cut to the top-k /
    nucleus — the order of transformers, vLLM, Dream and Fast-dLLM, so a checkpoint's recommended
    temperature + top-p mean here what they mean there."""
    if temperature > 0:
        logits = logits / temperature
    return filter_logits(logits, top_k, top_p)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (tokens, probability of each chosen token) for logits [..., V], both under decision_logits
    (the probability is the confidence that unmasking policies compare with their threshold). Tokens are
    chosen from float32 logits; the probability is a float64 softmax, as LLaDA's and Fast-dLLM's samplers
    compute it: float32 rounds two positions' near-equal confidences together (or reverses them), and then
    the positions a step commits are not theirs."""
    logits = decision_logits(logits.float(), temperature, top_k, top_p)
    tokens = choose_tokens(logits, temperature > 0, generator)
    return tokens, logits.double().softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def choose_tokens(logits: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Tokens [...] from decision logits [..., V]: argmax, or with `sample` Gumbel-max with float64 noise:
    argmax(l - log(-log u)) over already tempered logits, the log form of LLaDA's argmax(exp(l) / (-log u)^T);
    the float64 noise matters for low-temperature sampling of large vocabularies."""
    if not sample:
        return logits.argmax(-1)
    # draw where the generator lives (a seeded CPU generator keeps results device-independent);
    # unseeded sampling on a GPU draws on the GPU and avoids a host->device copy every step
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=device).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() + gumbel).argmax(-1)


def bias_vector(logit_bias: dict[int, float], vocab_size: int, device: torch.device | str) -> torch.Tensor | None:
    """OpenAI's `logit_bias` ({token id: bias}) as a dense [V] vector added to the logits (None if empty)."""
    if not logit_bias:
        return None
    bad = [t for t in logit_bias if not 0 <= t < vocab_size]
    if bad:
        from unmask.decoding.options import OptionsError

        raise OptionsError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    bias = torch.zeros(vocab_size)
    bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=bias.dtype)
    return bias.to(device)


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (log-probability of the token, top alternatives)


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """For log-probabilities [L, V] and the tokens chosen [L]: each token's log-probability and the `top`
    most likely tokens with theirs, on the host (one transfer)."""
    picked = logprobs.gather(-1, chosen[:, None]).squeeze(-1)
    if top <= 0:
        return [(lp, []) for lp in picked.tolist()]
    values, ids = logprobs.topk(top, dim=-1)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(picked.tolist(), ids.tolist(), values.tolist())]
