"""One request's decoding state: its canvas, its blocks and progress, and how a step's logits advance it.

The engine admits a Request into a batch row and runs the forward pass; the Request does the rest of the
step for itself (`update`): its logits processors, sampling, self-correction, the policy's step (one call
for every policy; a drafting one's next inputs go back to the request's proposer, decoding/drafts.py), and the
bookkeeping on the host copy of its canvas — block done, stop check, EOS early stop, the next block — and
answers with its StepEvent, the final one carrying its GenerationResult.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from unmask.decoding.drafts import NoDrafts
from unmask.decoding.events import StepEvent
from unmask.decoding.layout import AttentionLayout
from unmask.decoding.options import DecodeOptions
from unmask.decoding.plan import Plan, Slot
from unmask.decoding.policies import BlockStep, Policy, confidence
from unmask.decoding.processors import Processors, without_token
from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import TokenLogprob, choose_tokens, token_logprobs
from unmask.model.config import ModelConfig


@dataclass
class Request:
    """One request's canvas and progress. Engine-internal; callers see StepEvents and GenerationResults."""

    id: str
    options: DecodeOptions
    config: ModelConfig
    layout: AttentionLayout
    static_shapes: bool  # a compiled engine: one window width per request, whole-canvas refreshes
    x: torch.Tensor  # [n] canvas on the model's device
    plan: Plan  # fixed at submit: blocks, region, windows (decoding/plan.py)
    generated: torch.Tensor  # [n] bool: positions that started masked (only these may be corrected)
    processors: Processors  # its logits processors: banned tokens, healing, bias, penalties, sampling
    policy: Policy
    generator: torch.Generator | None
    slot: Slot = field(default_factory=Slot)  # the runner's: cache row, prefix-store fills
    block: int = 0
    block_step: int = 0
    correcting: int = -1  # -1 while filling masks; then the number of correction steps taken
    steps: int = 0
    nfe: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    t0: float = 0.0
    stopped_at_eos: bool = False
    stopped_by_check: bool = False
    host: list[int] = field(default_factory=list)  # host copy of x after the last step
    logprob_of: dict[int, TokenLogprob] = field(default_factory=dict)  # options.logprobs: canvas position -> ...
    # the current block, set by enter_block
    pos: torch.Tensor | None = None  # the block's positions
    src: torch.Tensor | None = None  # where each position's logit is read (position - 1 for logits_shift)
    window: tuple[int, int] = (0, 0)  # slots a window step recomputes (the plan's; drafting may narrow it)
    drafts: NoDrafts = field(default_factory=NoDrafts)  # its proposer: drafts fed at open positions (verify)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def inputs(self) -> torch.Tensor:
        """What the forward pass reads: the canvas, or with a drafting policy the canvas with its drafts."""
        return self.drafts.inputs(self.x)

    @property
    def entry_window(self) -> tuple[int, int] | None:
        """The block's first window: a later block's (block_causal), or a prefix hit's; None: a refresh."""
        return self.slot.first_window if self.block == 0 else self.plan.entry_windows[self.block]

    @property
    def visible(self) -> int:
        """Slots [0, visible) can influence the block: a refresh recomputes only those."""
        return self.plan.visible[self.block]

    def needs_refresh(self) -> bool:
        o = self.options
        if o.cache == "none" or (o.cache_refresh > 0 and self.block_step % o.cache_refresh == 0):
            return True
        return self.block_step == 0 and self.entry_window is None

    @property
    def entering(self) -> bool:
        """A later block's first step of a block_causal model: it runs the entry window."""
        return self.block_step == 0 and self.entry_window is not None

    def step_window(self) -> tuple[int, int]:
        """The slots this (window) step recomputes."""
        return self.entry_window if self.entering else self.window

    # ---- blocks ------------------------------------------------------------------------------------------
    def enter_block(self) -> None:
        blk = self.plan.blocks[self.block]
        self.pos = torch.tensor(blk, device=self.x.device)
        self.src = (self.pos - (1 if self.config.logits_shift else 0)).clamp_min(0)
        self.window = self.plan.windows[self.block]
        self.block_step, self.correcting = 0, -1
        self.policy.start_block(len(blk), self.plan.steps_budget)
        self.drafts.enter_block(self.pos)

    def start(self) -> None:
        """Admitted into a batch row: its first block begins."""
        if self.plan.blocks:
            self.enter_block()
            self.draft()

    def draft(self) -> None:
        """The proposer's drafts for the block's open positions; a window may then start at the first of them
        (uncompiled engines; compiled ones keep one shape)."""
        first = self.drafts.propose(self.plan.blocks[self.block], self.pos, self.host, self.config.mask_id)
        if first is not None and not self.static_shapes:
            self.window = (max(self.window[0], first - 1), self.window[1])

    # ---- one step ----------------------------------------------------------------------------------------
    def update(self, logits: torch.Tensor) -> StepEvent:
        """Advance by one step from the model's logits [L, V] for the block's positions."""
        # banned tokens first, as if the model could not say them; the reported log-probabilities are
        # the model's own distribution over what may be written: before healing, biases and penalties
        own = self.processors.restrict(logits, self.block)
        model_logprobs = None
        if self.options.logprobs is not None:
            model_logprobs = without_token(own.float(), self.config.mask_id).log_softmax(-1)
        self.nfe += 1
        return self._advance(self.processors.adjust(own, self.block), model_logprobs)

    def _advance(self, logits: torch.Tensor, model_logprobs: torch.Tensor | None) -> StepEvent:
        """Sample, correct, commit for the block; then bookkeeping on the host copy.
        `model_logprobs` [L, V]: the model's log-probabilities for the block, when options.logprobs is set."""
        o, c = self.options, self.config
        cur = self.x[self.pos]
        masked = cur == c.mask_id
        # tokens: float32 decision logits (temperature, top-k, top-p), never [MASK] (a committed mask would
        # never finish its block)
        choice = self.processors.decide(without_token(logits.float(), c.mask_id))
        tokens = choose_tokens(choice, o.temperature > 0, self.generator)
        # confidences as LLaDA's and Fast-dLLM's samplers compute them: a float64 softmax of all the logits,
        # the mask's share of the mass included (float32 rounds near-ties together and commits elsewhere);
        # a policy that ignores them (verify) skips the softmax over the vocabulary, unless correcting
        probs = conf = None
        if self.policy.reads_confidence or self.correcting >= 0:
            probs = self.processors.decide(logits.double()).softmax(-1)
            conf = confidence(o.confidence, probs, tokens, self.generator)
        new = cur
        last_correction = False
        if self.correcting >= 0:
            last_correction = self.correcting + 1 >= o.max_correction_steps
            new = self._correct(cur, without_token(probs, c.mask_id, 0.0), allow_remask=not last_correction)
        if last_correction:
            commit = masked  # the bound: whatever is still masked is committed now
        else:
            commit, next_inputs = self.policy.step(BlockStep(tokens, conf, cur, masked, self.block_step,
                                                             self.drafts.fed(cur, self.pos), self.drafts.follows,
                                                             c.mask_id))
            self.drafts.advance(self.pos, commit, next_inputs, tokens, cur, masked)
        new = torch.where(commit, tokens, new)
        self.x[self.pos] = new
        self.steps += 1
        self.block_step += 1
        if self.correcting >= 0:
            self.correcting += 1

        # one host sync per request and step
        before, row = self.host, self.x.tolist()
        self.host = row
        blk = self.plan.blocks[self.block]
        changed = [p for p in blk if row[p] != before[p]]
        if model_logprobs is not None and changed:
            self._record_logprobs(blk, new, model_logprobs, changed)
        left = sum(row[p] == c.mask_id for p in blk)
        block_done = False
        if left == 0:
            if self.correcting < 0 and o.self_correct and o.max_correction_steps > 0:
                self.correcting = 0  # masks filled: start the bounded correction post-steps
            elif self.correcting < 0 or not changed or self.correcting >= o.max_correction_steps:
                block_done = True
        if block_done:
            self.steps_per_block.append(self.block_step)
            if (self.plan.stop_when is not None and self.block + 1 < len(self.plan.blocks)
                    and self.plan.stop_when(self.answer_prefix())):
                self.stopped_by_check = True
                return self.finish(changed)
            eos_in_tail = self.plan.tail_start is not None and any(row[p] == c.eos_id for p in blk if p >= self.plan.tail_start)
            if o.early_stop and eos_in_tail and self.block + 1 < len(self.plan.blocks):
                rest = [p for b in self.plan.blocks[self.block + 1 :] for p in b]
                self.x[torch.tensor(rest, device=self.x.device)] = c.eos_id
                for p in rest:
                    row[p] = c.eos_id
                self.stopped_at_eos = True
                return self.finish(changed)
            self.block += 1
            if self.block == len(self.plan.blocks):
                return self.finish(changed)
            self.enter_block()
        self.draft()
        lo, hi = self.plan.region
        return StepEvent(self.id, self.steps, row[lo:hi], sum(t != c.mask_id for t in row[lo:hi]),
                         changed=[p - lo for p in changed if lo <= p < hi], logprobs=self.region_logprobs())

    def _record_logprobs(self, blk: list[int], new: torch.Tensor, model_logprobs: torch.Tensor,
                         changed: list[int]) -> None:
        """Keep the log-probability (and top alternatives) of each token this step committed or rewrote, as
        the model gave it at this step; a re-masked position forgets its entry until it is committed again."""
        at = {p: i for i, p in enumerate(blk)}
        idx = torch.tensor([at[p] for p in changed], device=new.device)
        entries = token_logprobs(model_logprobs[idx], new[idx], self.options.logprobs)
        for p, entry in zip(changed, entries):
            if self.host[p] == self.config.mask_id:
                self.logprob_of.pop(p, None)
            else:
                self.logprob_of[p] = entry

    def region_logprobs(self) -> list[TokenLogprob | None] | None:
        if self.options.logprobs is None:
            return None
        return [self.logprob_of.get(p) for p in range(*self.plan.region)]

    def answer_prefix(self) -> list[int]:
        """The committed tokens of the region up to its first mask (or EOS): text that can no longer change."""
        lo, hi = self.plan.region
        out = []
        for t in self.host[lo:hi]:
            if t == self.config.mask_id or (self.plan.cut_at_eos and t == self.config.eos_id):
                break
            out.append(t)
        return out

    def _correct(self, cur: torch.Tensor, probs: torch.Tensor, allow_remask: bool) -> torch.Tensor:
        """Self-correction on the block's generated tokens: rewrite where the model now prefers another
        token with probability >= rewrite_above; re-mask where the current token's probability < remask_below."""
        o, c = self.options, self.config
        committed = self.generated[self.pos] & (cur != c.mask_id)
        p_best, best = probs.max(-1)
        p_cur = probs.gather(-1, cur.clamp(0, probs.shape[-1] - 1)[:, None]).squeeze(-1)
        rewrite = committed & (best != cur) & (p_best >= o.rewrite_above)
        new = torch.where(rewrite, best, cur)
        if allow_remask:
            remask = committed & ~rewrite & (p_cur < o.remask_below)
            new = torch.where(remask, torch.full_like(new, c.mask_id), new)
        return new

    def finish(self, changed: list[int] | None = None) -> StepEvent:
        """The final event: its result (tokens, finish reason, counts, log-probabilities)."""
        c = self.config
        lo, hi = self.plan.region
        region = self.host[lo:hi] if self.host else self.x[lo:hi].tolist()
        tokens, finish = region, "length"
        if self.stopped_by_check:
            tokens, finish = self.answer_prefix(), "stop"
        elif self.plan.cut_at_eos and c.eos_id in region:
            tokens, finish = region[: region.index(c.eos_id)], "eos"
        elif self.stopped_at_eos:
            finish = "eos"
        result = GenerationResult(tokens=tokens, nfe=self.nfe, steps=self.steps,
                                  steps_per_block=list(self.steps_per_block), seconds=time.perf_counter() - self.t0,
                                  finish_reason=finish, prompt_tokens=self.plan.prompt_tokens)
        logprobs = self.region_logprobs()
        if logprobs is not None:  # context tokens of an edited canvas were never committed: None, []
            entries = logprobs[: len(tokens)]
            result.logprobs = [e[0] if e else None for e in entries]
            result.top_logprobs = [e[1] if e else [] for e in entries]
        return StepEvent(self.id, self.steps, region, sum(t != c.mask_id for t in region), done=True, result=result,
                         changed=[p - lo for p in (changed or []) if lo <= p < hi], logprobs=logprobs)
