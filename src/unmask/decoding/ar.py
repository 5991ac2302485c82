"""Autoregressive decoding with a KV cache, for the causal twin: the fair baseline for speed figures, the
batched answerer of sequence-level distillation, and the server's decoder for causal models.

`ARBatch` decodes several prompts of different lengths together, one token per row per `step()`: prompts
are left-padded (padding is invalid in the cache, and RoPE positions start at each prompt's first token,
so a row computes what it would alone). Each row has its own DecodeOptions (budget, sampling, penalties,
logit bias, logprobs, seed) and ends on its own (EOS, budget, a stop check, or cancel); the batch runs
until every row has ended. `ar_generate_batch` and `ar_generate` run one to the end; `ARQueue` gives the
engine's request-queue API (serve/worker.py drives it) over successive batches.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import TokenLogprob, bias_vector, penalize, sample_tokens, token_logprobs
from unmask.model.transformer import Transformer


@dataclass
class ARRow:
    """One prompt of an AR batch. `first_allowed` (bool [vocab]) restricts the first new token (token
    healing); `stop_when(tokens)` True after a new token ends the row there (stop strings)."""

    prompt: list[int]
    options: DecodeOptions
    first_allowed: torch.Tensor | None = None
    stop_at_eos: bool = True
    stop_when: Callable[[list[int]], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: str | None = None  # set when the row ends: "eos" | "length" | "stop" | "cancelled"
    nfe: int = 0  # forward passes while the row was live
    seconds: float = 0.0

    @property
    def live(self) -> bool:
        return self.finish is None


class ARBatch:
    """Rows decoded together (module docstring). `generator`: one generator for the whole batch, used when
    every row samples alike (ar_generate_batch's seed); otherwise each row draws from its own seed."""

    def __init__(self, model: Transformer, rows: Sequence[ARRow], generator: torch.Generator | None = None):
        c = model.config
        if c.attention != "causal":
            raise OptionsError(f"AR decoding needs a causal model, this one is {c.attention}")
        if not rows or any(not r.prompt for r in rows):
            raise OptionsError("AR decoding needs at least one prompt token")
        for r in rows:
            if len(r.prompt) + r.options.max_new_tokens > c.max_seq_len:
                raise OptionsError(f"prompt + new tokens = {len(r.prompt) + r.options.max_new_tokens} exceeds the "
                                   f"model context of {c.max_seq_len}")
        self.model, self.config, self.rows = model, c, list(rows)
        self.device = model.output.weight.device
        self.t0 = time.perf_counter()
        B, V = len(rows), c.vocab_size
        self.pos = P = max(len(r.prompt) for r in rows)
        total = P + max(r.options.max_new_tokens for r in rows)
        self.cache = model.new_cache(B, total)
        pad = torch.tensor([P - len(r.prompt) for r in rows], device=self.device)[:, None]
        slots = torch.arange(total, device=self.device)[None, :]
        self.cache.set_layout((slots - pad).clamp_min(0), slots >= pad)
        # sampling: one vectorised draw when every row samples alike, else one per row with its own seed
        first = rows[0].options
        same = all((r.options.temperature, r.options.top_k, r.options.top_p) ==
                   (first.temperature, first.top_k, first.top_p) for r in rows)
        unseeded = generator is not None or all(r.options.seed is None for r in rows) or first.temperature <= 0
        self.alike = same and unseeded  # (greedy rows draw nothing: their seeds do not matter)
        self.generators = [generator] * B if self.alike else [
            torch.Generator().manual_seed(r.options.seed) if r.options.seed is not None else None for r in rows]
        self.presence = torch.tensor([[r.options.presence_penalty] for r in rows], device=self.device)
        self.frequency = torch.tensor([[r.options.frequency_penalty] for r in rows], device=self.device)
        self.penalized = any(r.options.presence_penalty or r.options.frequency_penalty for r in rows)
        biases = [bias_vector(r.options.logit_bias, V, self.device) for r in rows]
        self.bias = None if all(b is None for b in biases) else torch.stack(
            [b if b is not None else torch.zeros(V, device=self.device) for b in biases])
        allowed = [r.first_allowed for r in rows]
        self.first_allowed = None if all(a is None for a in allowed) else torch.stack(
            [a[:V].to(self.device) if a is not None else torch.ones(V, dtype=torch.bool, device=self.device)
             for a in allowed])
        self.top = max((r.options.logprobs for r in rows if r.options.logprobs is not None), default=None)
        self.counts = torch.zeros(B, V, device=self.device)
        prompts = torch.tensor([[c.eos_id] * (P - len(r.prompt)) + list(r.prompt) for r in rows], device=self.device)
        self.logits = self._forward(prompts, 0)[:, -1]
        self.steps = 0

    @property
    def done(self) -> bool:
        return not any(r.live for r in self.rows)

    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        for r in self.rows:
            r.nfe += r.live
        return self.model(tokens, cache=self.cache, cache_start=start)

    def _end(self, row: ARRow, finish: str) -> None:
        row.finish, row.seconds = finish, time.perf_counter() - self.t0

    def cancel(self, b: int) -> None:
        if self.rows[b].live:
            self._end(self.rows[b], "cancelled")

    @torch.no_grad()
    def step(self) -> list[int]:
        """Choose one token for every live row; returns the rows that were live (each grew or ended)."""
        stepped = [b for b, r in enumerate(self.rows) if r.live]
        if not stepped:
            return []
        logits = self.logits
        model_logprobs = logits.float().log_softmax(-1) if self.top is not None else None
        if self.first_allowed is not None and self.steps == 0:
            logits = logits.masked_fill(~self.first_allowed, float("-inf"))
        if self.bias is not None:
            logits = logits + self.bias
        if self.penalized:
            logits = penalize(logits, self.counts, self.presence, self.frequency)
        tokens = self._choose(logits)
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
        entries = token_logprobs(model_logprobs, tokens, self.top) if model_logprobs is not None else None
        self.steps += 1
        for b, t in enumerate(tokens.tolist()):
            r = self.rows[b]
            if not r.live:
                continue
            if r.stop_at_eos and t == self.config.eos_id:
                self._end(r, "eos")
                continue
            r.tokens.append(t)
            if entries is not None and r.options.logprobs is not None:
                lp, top = entries[b]
                r.logprobs.append((lp, top[: r.options.logprobs]))
            if len(r.tokens) >= r.options.max_new_tokens:
                self._end(r, "length")
            elif r.stop_when is not None and r.stop_when(r.tokens):
                self._end(r, "stop")
        if not self.done:
            self.logits = self._forward(tokens[:, None], self.pos)[:, -1]
            self.pos += 1
        return stepped

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.alike:
            o = self.rows[0].options
            return sample_tokens(logits, o.temperature, o.top_k, o.top_p, self.generators[0])[0]
        return torch.cat([sample_tokens(logits[b : b + 1], r.options.temperature, r.options.top_k, r.options.top_p,
                                        self.generators[b])[0] for b, r in enumerate(self.rows)])

    def result(self, b: int) -> GenerationResult:
        r = self.rows[b]
        result = GenerationResult(tokens=list(r.tokens), nfe=r.nfe, steps=r.nfe, seconds=r.seconds,
                                  finish_reason=r.finish if r.finish in ("eos", "stop") else "length",
                                  prompt_tokens=len(r.prompt))
        if r.options.logprobs is not None:
            result.logprobs = [lp for lp, _ in r.logprobs]
            result.top_logprobs = [top for _, top in r.logprobs]
        return result


@torch.no_grad()
def ar_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop_at_eos: bool = True, on_step: Callable[[StepEvent], None] | None = None,
                first_allowed: torch.Tensor | None = None, presence_penalty: float = 0.0,
                frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
                logprobs: int | None = None) -> GenerationResult:
    """Greedy/sampled AR decoding of one prompt. `on_step` gets one StepEvent per new token (the final one
    done=True); `first_allowed` (bool [vocab]) restricts the first new token (token healing)."""
    options = DecodeOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            logit_bias=dict(logit_bias or {}), logprobs=logprobs)
    return ar_decode(model, ARRow(list(prompt_ids), options, first_allowed, stop_at_eos), on_step)


@torch.no_grad()
def ar_decode(model: Transformer, row: ARRow, on_step: Callable[[StepEvent], None] | None = None) -> GenerationResult:
    """One row to its end, with a StepEvent per new token to `on_step` (the final one done=True)."""
    batch = ARBatch(model, [row])
    while not batch.done:
        before = len(row.tokens)
        batch.step()
        n = len(row.tokens)
        if on_step is not None and n > before:
            on_step(StepEvent("0", n, list(row.tokens), n, changed=[n - 1],
                              logprobs=list(row.logprobs) if row.options.logprobs is not None else None))
    result = batch.result(0)
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
    """AR decoding of several prompts in one ARBatch, all sampled alike (one generator, from `seed`), each
    with its own budget (`max_new_tokens`: one for all or one per prompt). `first_allowed`: [vocab] for all
    or [prompts, vocab]. `on_token(row, tokens)` after each new token. `logit_bias` ({token id: bias}) is
    added to the logits; `logprobs` (k) records each new token's log-probability under the model (before
    biases and penalties) and its k most likely alternatives. Each result counts the forward passes and
    the time until its row ended."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise OptionsError(f"{len(budgets)} budgets for {len(prompts)} prompts")
    allowed = [first_allowed] * len(prompts) if first_allowed is None or first_allowed.dim() == 1 else list(first_allowed)
    base = DecodeOptions(temperature=temperature, top_k=top_k, top_p=top_p, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, logit_bias=dict(logit_bias or {}), logprobs=logprobs)
    rows = [ARRow(list(p), base.replace(max_new_tokens=max(n, 1)), a, stop_at_eos) for p, n, a in zip(prompts, budgets, allowed)]
    batch = ARBatch(model, rows, torch.Generator().manual_seed(seed) if seed is not None else None)
    for b, n in enumerate(budgets):
        if n < 1:
            batch.cancel(b)  # nothing to write: it ends at once, with finish "length"
    while not batch.done:
        before = [len(r.tokens) for r in rows]
        for b in batch.step():
            if on_token is not None and len(rows[b].tokens) > before[b]:
                on_token(b, rows[b].tokens)
    return [batch.result(b) for b in range(len(rows))]


class ARQueue:
    """The diffusion Engine's request-queue API for a causal model, so the server serves AR twins too:
    waiting requests start together as one ARBatch of up to `max_batch` rows; a new batch starts when the
    running one has ended (static batching: simple, and fair to each request's wait)."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_queue: int = 64):
        if model.config.attention != "causal":
            raise OptionsError("ARQueue decodes causal models; diffusion models use the Engine")
        if max_batch < 1 or max_queue < 0:
            raise OptionsError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.config = model, model.config
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque[tuple[str, ARRow]] = deque()
        self._batch: ARBatch | None = None
        self._ids: list[str] = []  # request id of each row of the running batch
        self._counter = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return 0 if self._batch is None else sum(r.live for r in self._batch.rows)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0

    def submit(self, prompt_ids: list[int], options: DecodeOptions, request_id: str | None = None,
               suffix_ids: list[int] | None = None, stop_when: Callable[[list[int]], bool] | None = None,
               first_allowed: torch.Tensor | None = None) -> str:
        from unmask.decoding.engine import QueueFull

        if suffix_ids:
            raise OptionsError("infilling (a suffix) needs a diffusion model; this one is autoregressive")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"queue full: {len(self._waiting)} requests waiting (max_queue {self.max_queue})")
        c = self.config
        if not prompt_ids:
            raise OptionsError("AR decoding needs at least one prompt token")
        if len(prompt_ids) + options.max_new_tokens > c.max_seq_len:
            raise OptionsError(f"prompt of {len(prompt_ids)} tokens + {options.max_new_tokens} new tokens exceeds "
                               f"the model context of {c.max_seq_len} tokens")
        if min(prompt_ids) < 0 or max(prompt_ids) >= c.vocab_size:
            raise OptionsError(f"token ids must be in [0, {c.vocab_size})")
        bias_vector(options.logit_bias, c.vocab_size, "cpu")  # a bad token id fails here, not mid-batch
        request_id = request_id if request_id is not None else f"req-{next(self._counter)}"
        if request_id in self._ids or any(rid == request_id for rid, _ in self._waiting):
            raise OptionsError(f"request id {request_id!r} is already in use")
        self._waiting.append((request_id, ARRow(list(prompt_ids), options, first_allowed, True, stop_when)))
        return request_id

    def cancel(self, request_id: str) -> None:
        self._waiting = deque(w for w in self._waiting if w[0] != request_id)
        if self._batch is not None and request_id in self._ids:
            self._batch.cancel(self._ids.index(request_id))

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if (self._batch is None or self._batch.done) and self._waiting:
            taken = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            self._ids = [rid for rid, _ in taken]
            self._batch = ARBatch(self.model, [row for _, row in taken])
        if self._batch is None:
            return []
        events = []
        for b in self._batch.step():
            row = self._batch.rows[b]
            if row.finish == "cancelled":
                continue
            n = len(row.tokens)
            done = not row.live
            events.append(StepEvent(self._ids[b], row.nfe, list(row.tokens), n,
                                    done=done, result=self._batch.result(b) if done else None,
                                    changed=[n - 1] if n and row.finish != "eos" else [],
                                    logprobs=list(row.logprobs) if row.options.logprobs is not None else None))
        return events
