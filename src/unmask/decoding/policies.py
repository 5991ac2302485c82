"""Unmasking policies: which masked positions of the current block to commit at a step (REFERENCE.md §2).

A policy sees one block of one request: the confidence of each position's proposed token and which positions
are still masked. It returns a boolean commit mask. Policies never sync with the host (no `.item()`): the
number of tokens to commit is computed as a tensor and applied by ranking.

    fixed      the reference behaviour: the block's mask count split evenly over its step budget
    threshold  every masked position with confidence >= τ, and always at least the most confident one
    factor     Fast-dLLM's factor rule: the largest n whose sorted confidences satisfy c_(i) >= 1 - f / (i + 1)
    leftmost   threshold, but the token always committed is the leftmost masked one (causal-inside-block
               models: that one is the AR model's own prediction, so greedy quality is AR's at least)
    eb         EB-Sampler (Ben-Hamu et al. 2025): surest first, as many as keep the summed error of all but the
               last within γ; error = -log(confidence), the entropy with confidence="entropy"
    verify     causal-inside-block models: drafts are fed in place of masks and a token is committed only where
               every input before it was the committed token, so the result is the AR base's own decoding,
               exactly (greedy or sampled); drafts only decide how many tokens a step confirms

Confidences (options.confidence) are all in [0, 1] so one threshold means the same for each:
    prob     probability of the proposed token (LLaDA low-confidence remasking, Dream `maskgit_plus`)
    margin   top-1 minus top-2 probability (Dream `topk_margin`)
    entropy  exp(-entropy) of the distribution (Dream `entropy`; 1 = certain)
    random   uniform noise (LLaDA `random` remasking)

A new policy is one small class registered in POLICIES; the engine loop does not change. Its knobs are
`Param`s in its `params`: DecodeOptions validates them, the CLI makes each an option and the server a
request field, and `GET /v1/policies` lists them (see docs/engine.md, "Adding a policy").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unmask.decoding.params import OptionsError, Param

if TYPE_CHECKING:  # options.py validates through this registry, so it imports us, not we it
    from unmask.decoding.options import DecodeOptions


def confidence(kind: str, probs: torch.Tensor, chosen: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Confidence [L] of the proposed tokens `chosen` [L] under `probs` [L, V] (float64 softmax)."""
    if kind == "prob":
        return probs.gather(-1, chosen[:, None]).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        ent = -(probs * probs.clamp_min(1e-300).log()).sum(-1)
        return torch.exp(-ent)
    if kind == "random":
        # CPU generator as in sample_tokens: seeded runs give the same draws on any device
        return torch.rand(chosen.shape, generator=generator, dtype=torch.float64).to(probs.device)
    raise OptionsError(f"unknown confidence {kind!r}; use prob, margin, entropy or random")


def top_k_mask(conf: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Commit mask: the `k` (a 0-d tensor) most confident candidates. Ties keep the earlier position."""
    conf = torch.where(candidates, conf, torch.full_like(conf, float("-inf")))
    order = torch.sort(conf, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return candidates & (rank < k)


# knobs that more than one policy reads are declared once
THRESHOLD = Param("threshold", 0.9, "confidence τ: every masked position at least this sure is committed", gt=0.0,
                  le=1.0)


@dataclass
class BlockStep:
    """What a policy sees of one step over a block of L positions: this step's proposed tokens [L], their
    confidences [L] (None where the policy reads none), the block now [L] (mask where open), the open
    positions [L], the step's index in the block, and what the forward pass read there [L] with `follows`
    [L] (position i is the canvas position right after i - 1); without drafts `fed` is the block itself."""

    tokens: torch.Tensor
    conf: torch.Tensor | None
    cur: torch.Tensor
    masked: torch.Tensor
    index: int
    fed: torch.Tensor
    follows: torch.Tensor | None
    mask_id: int


class Policy:
    """Base: `step(BlockStep)` -> (commit mask over the block's positions, what to feed at the open ones next
    step or None); most policies only `select(conf, candidates, step)`."""

    name = "base"
    help = ""  # one line, shown by the CLI and GET /v1/policies
    params: tuple[Param, ...] = ()  # the knobs it reads (options.param(name)); steps, cache, ... are everyone's
    drafts = False  # True: the request feeds drafts at open positions (decoding/drafts.py), which step() reads
    reads_confidence = True  # False: step() never looks at the confidences (they are not computed)

    def __init__(self, options: DecodeOptions):
        self.options = options

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"name": cls.name, "help": cls.help, "params": [
            {"name": p.name, "type": p.kind.__name__, "default": p.default, "range": p.bounds(), "help": p.help,
             **{k: getattr(p, k) for k in ("ge", "gt", "le", "lt") if getattr(p, k) is not None}}
            for p in cls.params]}

    def start_block(self, n_masks: int, steps_budget: int) -> None:
        """Called when a block begins; fixed-step policies plan their schedule here."""

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, s: BlockStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The engine's one call per step: what to commit, and the next inputs of a drafting policy."""
        return self.select(s.conf, s.masked, s.index), None


class FixedStepsPolicy(Policy):
    """LLaDA `generate`: commit schedule[step] tokens, the mask count split evenly (remainder first)."""

    name = "fixed"
    help = "the mask count split evenly over the step budget (--steps), as LLaDA"

    def start_block(self, n_masks: int, steps_budget: int) -> None:
        base, rem = divmod(n_masks, steps_budget)
        self.schedule = [base + (i < rem) for i in range(steps_budget)]

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        # past the budget (self-correction re-masked something) commit one per step, so it still ends
        k = self.schedule[step] if step < len(self.schedule) else 1
        return top_k_mask(conf, candidates, torch.tensor(max(k, 1), device=conf.device))


class ThresholdPolicy(Policy):
    """Fast-dLLM threshold: all candidates with confidence >= τ, at least the top one.
    τ = 1.0 therefore commits exactly one token per step (confidence never exceeds 1 by much)."""

    name = "threshold"
    help = "every position with confidence >= τ, at least the surest one (Fast-dLLM)"
    params = (THRESHOLD,)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        # 1.0 must mean one per step even when a probability rounds to exactly 1.0
        tau = self.options.threshold
        sure = candidates & (conf >= tau) if tau < 1.0 else torch.zeros_like(candidates)
        return sure | top_k_mask(conf, candidates, torch.tensor(1, device=conf.device))


class LeftmostThresholdPolicy(Policy):
    """Every candidate with confidence >= τ, and always the leftmost candidate. A model with causal attention
    inside its blocks and shifted logits reads the leftmost mask from the committed token before it, which is
    how its AR base predicts the next token; so each step advances at least as greedy AR decoding would, and
    every look-ahead token surer than τ is a step saved. τ = 1.0 decodes exactly as greedy AR."""

    name = "leftmost"
    help = "every position with confidence >= τ, and always the leftmost one (greedy AR at least)"
    params = (THRESHOLD,)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        tau = self.options.threshold
        sure = candidates & (conf >= tau) if tau < 1.0 else torch.zeros_like(candidates)
        return sure | (candidates & (candidates.cumsum(0) == 1))


class FactorPolicy(Policy):
    """Fast-dLLM factor: sort confidences descending, commit the largest n with c_(i) >= 1 - f/(i+1)
    for every i <= n (i counted from 1), at least one."""

    name = "factor"
    help = "the largest n whose sorted confidences satisfy c_(i) >= 1 - f / (i + 1) (Fast-dLLM)"
    params = (Param("factor", 1.0, "f of the factor rule: larger commits more per step", gt=0.0),)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        masked = torch.where(candidates, conf, torch.full_like(conf, float("-inf")))
        ranked = torch.sort(masked, descending=True).values
        i = torch.arange(1, ranked.numel() + 1, device=conf.device, dtype=ranked.dtype)
        ok = (ranked >= 1.0 - self.options.factor / (i + 1)).long().cumprod(0)
        k = ok.sum().clamp_min(1)
        return top_k_mask(conf, candidates, k)


class EntropyBoundPolicy(Policy):
    """EB-Sampler: rank candidates by error e = -log(confidence), commit the longest surest-first run whose
    errors before its last token sum to <= γ (options.entropy_bound). The surest token always goes (nothing
    precedes it); γ = 0 commits one token a step unless several are certain; a large γ commits the block.
    Where the threshold policy asks each token to be sure on its own, this bounds the joint error of a step:
    many near-certain tokens go together, two merely likely ones do not."""

    name = "eb"
    help = "surest first while the summed error -log(confidence) before the last stays <= γ (EB-Sampler)"
    params = (Param("entropy_bound", 0.5, "γ: the error (-log confidence) a step may add beyond its surest token",
                    ge=0.0),)

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        error = -torch.log(conf.double().clamp_min(1e-300))
        ranked = torch.sort(torch.where(candidates, error, torch.full_like(error, float("inf")))).values
        before = ranked.cumsum(0) - ranked  # error of the surer tokens; non-candidates (inf - inf) are NaN
        k = (before <= self.options.entropy_bound).sum().clamp_min(1)
        return top_k_mask(conf, candidates, k)


class VerifyPolicy(Policy):
    """Self-speculative decoding for models with causal attention inside their blocks and shifted logits.

    Such a model reads position p's token from its output at p - 1, which sees only the inputs up to p - 1.
    So if the inputs from the leftmost masked position F up to p - 1 are the tokens this step commits there,
    position p's token is drawn from exactly the distribution the AR base gives it. The engine feeds
    *drafts* in place of masks (decoding/drafts.py); this policy commits F, then each next position while
    the input before it matched, and stops at the first mismatch (whose own token is still exact: it is
    read from a matching prefix). Every committed token is therefore the AR base's, greedy or sampled, and
    each right draft saves a step. Confidences play no part.

    Drafts come from two places (`next_inputs`): where this step's inputs after the committed run were
    masks, the model's look-ahead through them is a draft conditioned on the right tokens; after a wrong
    draft everything downstream is stale, so those positions go back to masks (the engine may then draft
    them by copying from the context)."""

    name = "verify"
    help = "drafts verified against the model itself: exactly the AR base's decoding (causal-inside-block models)"
    drafts = True
    reads_confidence = False

    def select(self, conf: torch.Tensor, candidates: torch.Tensor, step: int) -> torch.Tensor:
        return candidates & (candidates.cumsum(0) == 1)  # with no drafts fed: the leftmost, as greedy AR

    def verify(self, proposed: torch.Tensor, cur: torch.Tensor, fed: torch.Tensor, candidates: torch.Tensor,
               follows: torch.Tensor) -> torch.Tensor:
        """Commit mask over the block. proposed [L]: this step's tokens; cur [L]: the block now (mask where
        open); fed [L]: what this step's forward pass read at each position; follows [L]: position i is
        the canvas position right after position i - 1 (follows[0] is ignored)."""
        final = torch.where(candidates, proposed, cur)
        matched = torch.ones_like(candidates)
        matched[1:] = (fed[:-1] == final[:-1]) & follows[1:]
        started = candidates.cumsum(0) >= 1
        chain = (matched | ~started).long().cumprod(0).bool()
        leftmost = candidates & (candidates.cumsum(0) == 1)
        return leftmost | (candidates & started & chain)

    def step(self, s: BlockStep) -> tuple[torch.Tensor, torch.Tensor | None]:
        commit = self.verify(s.tokens, s.cur, s.fed, s.masked, s.follows)
        return commit, self.next_inputs(s.tokens, s.fed, s.masked & ~commit, s.follows, s.mask_id)

    def next_inputs(self, proposed: torch.Tensor, fed: torch.Tensor, open_after: torch.Tensor,
                    follows: torch.Tensor, mask_id: int) -> torch.Tensor:
        """What to feed at the block's open positions next step [L] (mask_id: no draft). The proposals are
        kept only if the first open position's predecessor read a mask: then nothing wrong was fed before
        them and they are the model's look-ahead from the committed text."""
        first_open = open_after & (open_after.cumsum(0) == 1)
        before = torch.full_like(fed, mask_id)
        before[1:] = fed[:-1]
        clean = (first_open & follows & (before == mask_id)).any()
        return torch.where(open_after & clean, proposed, torch.full_like(proposed, mask_id))


# the registry: one line per policy; options, CLI, server and page take the names and knobs from here
POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FixedStepsPolicy, ThresholdPolicy, FactorPolicy,
                                                         EntropyBoundPolicy, LeftmostThresholdPolicy, VerifyPolicy)}


def declared_params() -> dict[str, Param]:
    """Every knob a registered policy declares, by name. Policies that share a knob share its declaration."""
    found: dict[str, Param] = {}
    for cls in POLICIES.values():
        for p in cls.params:
            assert found.setdefault(p.name, p) == p, f"policy {cls.name} redeclares {p.name} differently"
    return found


def param_problem(name: str, value: object, policy: str | None = None) -> str | None:
    """One message naming the policy and the knob if `value` is not valid for knob `name`, else None. The
    policy named is `policy` where it reads the knob, else every policy that does."""
    problem = declared_params()[name].problem(value)
    if problem is None:
        return None
    users = [n for n, cls in POLICIES.items() if any(p.name == name for p in cls.params)]
    who = policy if policy in users else " and ".join(users)
    return f"{name} {problem} ({who} {'policy' if who in users else 'policies'})"


def make_policy(options: DecodeOptions) -> Policy:
    if options.policy not in POLICIES:
        raise OptionsError(f"unknown policy {options.policy!r}; use one of {', '.join(POLICIES)}")
    return POLICIES[options.policy](options)
