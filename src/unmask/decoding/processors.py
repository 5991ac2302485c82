"""Logits processors: what a request does to the model's logits before a token is chosen.

Each processor has one job and maps one request's block logits [L, V] to new logits; `processors_for`
builds a request's chain once from its options, with only the processors that change something. The
engine applies the chain in three stages, in this order:

    restrict  BannedTokens                    as if the model could not say them: the reported
                                              log-probabilities (options.logprobs) are taken after this
    adjust    FirstTokenRestriction (healing), LogitBias, Penalties
    decide    Temperature, TopK, TopP         the distribution a token is drawn from (transformers', vLLM's,
                                              Dream's and Fast-dLLM's order: temperature first)

`decide` runs on float32 logits for the token choice (as AR decoding chooses) and on float64 ones for the
confidences (as LLaDA's and Fast-dLLM's samplers compute them), so a processor keeps the dtype it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unmask.decoding.options import DecodeOptions
from unmask.decoding.sampling import bias_vector, nucleus, penalize


class Processor:
    """One change to a request's logits [L, V] (the block's positions). `block` is the request's current
    block index; processors that do not care ignore it. Returns new logits (never writes its input)."""

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        raise NotImplementedError


class BannedTokens(Processor):
    """Tokens the request may never write (an edit's special tokens): their logits become -inf."""

    def __init__(self, banned: torch.Tensor):
        self.banned = banned  # bool [V]

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return logits.masked_fill(self.banned, float("-inf"))


class FirstTokenRestriction(Processor):
    """Token healing (decoding/healing.py): the answer's first token must be one of `allowed` (bool [V]).
    That token is the first position of the first block, so later blocks pass through."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        if block != 0:
            return logits
        logits = logits.clone()
        logits[0].masked_fill_(~self.allowed, float("-inf"))
        return logits


class LogitBias(Processor):
    """OpenAI's `logit_bias`, as a dense [V] vector added to every position."""

    def __init__(self, bias: torch.Tensor):
        self.bias = bias

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return logits + self.bias


class Penalties(Processor):
    """OpenAI's presence / frequency penalties over the tokens the request has committed so far. It reads
    the request's canvas each call (the engine writes the canvas in place), counting generated positions
    that are no longer masked, in whatever order they were committed."""

    def __init__(self, presence: float, frequency: float, canvas: torch.Tensor, generated: torch.Tensor,
                 mask_id: int):
        self.presence, self.frequency = presence, frequency
        self.canvas, self.generated, self.mask_id = canvas, generated, mask_id

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        done = self.canvas[self.generated & (self.canvas != self.mask_id)]
        V = logits.shape[-1]
        counts = torch.bincount(done, minlength=V)[:V]
        return penalize(logits, counts, self.presence, self.frequency)


class Temperature(Processor):
    def __init__(self, temperature: float):
        assert temperature > 0, "temperature 0 is greedy: no processor"
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return logits / self.temperature


class TopK(Processor):
    """Logits below the k-th largest become -inf (ties at the k-th all stay)."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        if not 0 < self.k < logits.shape[-1]:
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP(Processor):
    """Logits outside the nucleus (the most probable tokens holding top_p of the mass) become -inf."""

    def __init__(self, top_p: float):
        self.top_p = top_p

    def __call__(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return logits.masked_fill(~nucleus(logits, self.top_p), float("-inf"))


def without_token(logits: torch.Tensor, token: int, value: float = float("-inf")) -> torch.Tensor:
    """A copy of logits [..., V] (or probabilities, with value 0) in which `token` cannot be chosen."""
    logits = logits.clone()
    logits[..., token] = value
    return logits


def _run(chain: list[Processor], logits: torch.Tensor, block: int) -> torch.Tensor:
    for p in chain:
        logits = p(logits, block)
    return logits


@dataclass
class Processors:
    """A request's chain, in its three stages (see the module docstring)."""

    restricting: list[Processor] = field(default_factory=list)
    adjusting: list[Processor] = field(default_factory=list)
    deciding: list[Processor] = field(default_factory=list)

    def restrict(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return _run(self.restricting, logits, block)

    def adjust(self, logits: torch.Tensor, block: int) -> torch.Tensor:
        return _run(self.adjusting, logits, block)

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        return _run(self.deciding, logits, 0)  # deciding processors are the same in every block


def processors_for(options: DecodeOptions, vocab_size: int, device: torch.device | str, *,
                   banned: torch.Tensor | None = None, first_allowed: torch.Tensor | None = None,
                   canvas: torch.Tensor | None = None, generated: torch.Tensor | None = None,
                   mask_id: int = -1) -> Processors:
    """The chain of one request. `banned` / `first_allowed`: bool [V] on `device` (None: none); the
    penalties read `canvas` [n] and `generated` [n] (bool: positions that started masked) each step."""
    chain = Processors()
    if banned is not None:
        chain.restricting.append(BannedTokens(banned))
    if first_allowed is not None:
        chain.adjusting.append(FirstTokenRestriction(first_allowed))
    bias = bias_vector(options.logit_bias, vocab_size, device)
    if bias is not None:
        chain.adjusting.append(LogitBias(bias))
    if options.presence_penalty or options.frequency_penalty:
        assert canvas is not None and generated is not None, "penalties count the request's committed tokens"
        chain.adjusting.append(Penalties(options.presence_penalty, options.frequency_penalty, canvas, generated,
                                         mask_id))
    if options.temperature > 0:
        chain.deciding.append(Temperature(options.temperature))
    if options.top_k is not None and options.top_k > 0:
        chain.deciding.append(TopK(options.top_k))
    if options.top_p is not None and 0 < options.top_p < 1:
        chain.deciding.append(TopP(options.top_p))
    return chain
