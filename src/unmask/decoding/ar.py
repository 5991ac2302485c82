"""Autoregressive decoding with a KV cache, for the causal twin: the fair baseline for speed figures, the
batched answerer of sequence-level distillation, and the server's decoder for causal models.

`ARBatch` decodes several prompts of different lengths together, one token per row per `step()`: prompts
are left-padded (padding is invalid in the cache, and RoPE positions start at each prompt's first token,
so a row computes what it would alone). Each row has its own DecodeOptions (budget, sampling, penalties,
logit bias, logprobs, seed), applied by the engine's logits processors (decoding/processors.py: a row is a
block of one position), and ends on its own (EOS, budget, a stop check, or cancel); the batch runs
until every row has ended, and new rows may `join` it in places that have ended. `ar_generate_batch`,
`ar_generate` and `ar_decode` run a batch to the end; `ARQueue` gives the engine's request-queue API
(serve/worker.py drives it) with continuous batching.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from unmask.decoding.cache import CacheView
from unmask.decoding.contract import CanvasRequest, Capacity, DecodeRequest, as_request, check_context, check_submit
from unmask.decoding.layout import layout_for
from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.processors import Processors, processors_for
from unmask.decoding.result import GenerationResult
from unmask.decoding.sampling import TokenLogprob, bias_vector, sample_tokens, token_logprobs
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
    started: float = 0.0  # perf_counter when it entered a batch
    seconds: float = 0.0  # from then until it ended

    @property
    def live(self) -> bool:
        return self.finish is None


class ARBatch:
    """Rows decoded together (module docstring). `generator`: one generator for the whole batch, used when
    every row samples alike (ar_generate_batch's seed); otherwise each row draws from its own seed.
    `capacity`: rows to make room for, so that requests can `join` a running batch (ARQueue)."""

    def __init__(self, model: Transformer, rows: Sequence[ARRow], generator: torch.Generator | None = None,
                 capacity: int = 0):
        c = model.config
        if layout_for(c).diffusion:
            raise OptionsError(f"AR decoding needs a causal model, this one is {layout_for(c).name}")
        if not rows or any(not r.prompt for r in rows):
            raise OptionsError("AR decoding needs at least one prompt token")
        for r in rows:
            self._check_fits(c, r)
        self.model, self.config, self.generator = model, c, generator
        self.device = model.output.weight.device
        t0 = time.perf_counter()
        for r in rows:
            r.started = t0
        # free places hold an ended one-token row: its keys stay valid, its outputs are never read
        self.rows = list(rows) + [ARRow([c.eos_id], DecodeOptions(max_new_tokens=1), finish="empty")
                                  for _ in range(capacity - len(rows))]
        B = len(self.rows)
        self.pos = P = max(len(r.prompt) for r in rows)  # the slot every row writes next
        self.cache = model.new_cache(B, P + max(r.options.max_new_tokens for r in rows))
        self.offset = [P - len(r.prompt) for r in self.rows]  # each row's first slot (left padding before it)
        self._layout()
        self.generators: list[torch.Generator | None] = [None] * B
        self.processors: list[Processors] = [Processors()] * B  # each row's healing, bias, penalties
        self.written: list[torch.Tensor | None] = [None] * B  # a row's new tokens, where its penalties count them
        self.first = [True] * B  # the row's next token is its first
        for b, r in enumerate(self.rows):
            self._settings(b, r)
        prompts = torch.tensor([[c.eos_id] * o + list(r.prompt) for o, r in zip(self.offset, self.rows)],
                               device=self.device)
        self.logits = self._forward(prompts, 0)
        self.steps = 0

    @staticmethod
    def _check_fits(c, row: ARRow) -> None:
        check_context(len(row.prompt), row.options.max_new_tokens, c.max_seq_len)

    def _layout(self) -> None:
        """RoPE positions count from each row's first slot; slots before it are padding."""
        slots = torch.arange(self.cache.max_len, device=self.device)[None, :]
        offset = torch.tensor(self.offset, device=self.device)[:, None]
        self.cache.set_layout((slots - offset).clamp_min(0), slots >= offset)

    def _settings(self, b: int, r: ARRow) -> None:
        """Row b's sampling state from its options (at the start, or when a request joins there). Its logits
        processors see the row as a block of one position, the first token as block 0; the penalties count
        the tokens written so far (-1: none yet)."""
        V, o = self.config.vocab_size, r.options
        self.generators[b] = torch.Generator().manual_seed(o.seed) if o.seed is not None else None
        self.first[b] = True
        penalized = bool(o.presence_penalty or o.frequency_penalty)
        self.written[b] = torch.full((o.max_new_tokens,), -1, device=self.device) if penalized else None
        allowed = None if r.first_allowed is None else r.first_allowed[:V].to(self.device)
        self.processors[b] = processors_for(o, V, self.device, first_allowed=allowed, canvas=self.written[b],
                                            generated=None if not penalized else torch.ones_like(
                                                self.written[b], dtype=torch.bool), mask_id=-1)

    @property
    def done(self) -> bool:
        return not any(r.live for r in self.rows)

    @torch.no_grad()  # also for the prefill in __init__: a graph there would keep every prompt activation alive
    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [B, V] of the last position (a prompt's other positions need only their K/V: projecting
        them onto a 49k vocabulary would cost more memory than the rest of the batch)."""
        for r in self.rows:
            r.nfe += r.live
        return self.model.output(self.model(tokens, cache=self.cache, cache_start=start, return_hidden=True)[:, -1])

    def _end(self, row: ARRow, finish: str) -> None:
        row.finish, row.seconds = finish, time.perf_counter() - row.started

    def cancel(self, b: int) -> None:
        if self.rows[b].live:
            self._end(self.rows[b], "cancelled")

    def can_join(self, row: ARRow) -> bool:
        """A free place, a prompt that fits before the next slot, and its answer within the context."""
        return (any(not r.live for r in self.rows) and len(row.prompt) <= self.pos
                and self.pos + row.options.max_new_tokens <= self.config.max_seq_len)

    @torch.no_grad()
    def join(self, row: ARRow) -> int:
        """Put `row` in a free place of the running batch (check can_join first): its prompt fills the slots
        just before the next one, so from the next step on it decodes with the others."""
        self._check_fits(self.config, row)
        b = next(i for i, r in enumerate(self.rows) if not r.live)
        L, need = len(row.prompt), self.pos + row.options.max_new_tokens
        if need > self.cache.max_len:  # grow the cache, keeping every row's K/V
            old, self.cache = self.cache, self.model.new_cache(len(self.rows), need)
            self.cache.k[..., : old.max_len, :] = old.k
            self.cache.v[..., : old.max_len, :] = old.v
        self.rows[b], self.offset[b] = row, self.pos - L
        self._layout()
        self._settings(b, row)
        row.started = time.perf_counter()
        view = CacheView(self.cache, slice(b, b + 1), None, self.pos)
        view.positions, view.valid = self.cache.positions[b : b + 1], self.cache.valid[b : b + 1]
        prompt = torch.tensor([row.prompt], device=self.device)
        self.logits[b] = self.model(prompt, cache=view, cache_start=self.pos - L, kv_len=self.pos)[0, -1]
        row.nfe += 1
        return b

    @torch.no_grad()
    def step(self) -> list[int]:
        """Choose one token for every live row; returns the rows that were live (each grew or ended)."""
        stepped = [b for b, r in enumerate(self.rows) if r.live]
        if not stepped:
            return []
        model_logprobs = self.logits.float().log_softmax(-1) if self._top() is not None else None
        tokens = self._choose(self._adjusted(stepped), stepped)
        entries = token_logprobs(model_logprobs, tokens, self._top()) if model_logprobs is not None else None
        self.steps += 1
        for b, t in enumerate(tokens.tolist()):
            r = self.rows[b]
            if not r.live:
                continue
            self.first[b] = False
            if r.stop_at_eos and t == self.config.eos_id:
                self._end(r, "eos")
                continue
            r.tokens.append(t)
            if self.written[b] is not None:
                self.written[b][len(r.tokens) - 1] = t
            if entries is not None and r.options.logprobs is not None:
                lp, top = entries[b]
                r.logprobs.append((lp, top[: r.options.logprobs]))
            if len(r.tokens) >= r.options.max_new_tokens:
                self._end(r, "length")
            elif r.stop_when is not None and r.stop_when(r.tokens):
                self._end(r, "stop")
        if not self.done:
            self.logits = self._forward(tokens[:, None], self.pos)
            self.pos += 1
        return stepped

    def _adjusted(self, stepped: list[int]) -> torch.Tensor:
        """The logits after each live row's adjusting processors (healing, logit bias, penalties)."""
        rows = {b: self.processors[b].adjust(self.logits[b : b + 1], 0 if self.first[b] else 1)
                for b in stepped if self.processors[b].adjusting}
        if not rows:
            return self.logits
        dtype = self.logits.dtype
        for adjusted in rows.values():  # a float32 logit bias lifts bf16 logits to float32, as the sum does
            dtype = torch.promote_types(dtype, adjusted.dtype)
        logits = self.logits.to(dtype, copy=True)
        for b, adjusted in rows.items():
            logits[b : b + 1] = adjusted
        return logits

    def _top(self) -> int | None:
        return max((r.options.logprobs for r in self.rows if r.live and r.options.logprobs is not None), default=None)

    def result(self, b: int) -> GenerationResult:
        r = self.rows[b]
        result = GenerationResult(tokens=list(r.tokens), nfe=r.nfe, steps=r.nfe, seconds=r.seconds,
                                  finish_reason=r.finish if r.finish in ("eos", "stop") else "length",
                                  prompt_tokens=len(r.prompt))
        if r.options.logprobs is not None:
            result.logprobs = [lp for lp, _ in r.logprobs]
            result.top_logprobs = [top for _, top in r.logprobs]
        return result

    def _choose(self, logits: torch.Tensor, live: list[int]) -> torch.Tensor:
        """One vectorised draw when the live rows sample alike (greedy, or one shared generator, or no seeds);
        else each live row draws from its own generator, the others get EOS."""
        settings = {(o.temperature, o.top_k, o.top_p) for o in (self.rows[b].options for b in live)}
        (temperature, top_k, top_p), *more = settings
        unseeded = all(self.rows[b].options.seed is None for b in live)
        if not more and (temperature <= 0 or self.generator is not None or unseeded):
            return sample_tokens(logits, temperature, top_k, top_p, self.generator)[0]
        tokens = torch.full((len(self.rows),), self.config.eos_id, dtype=torch.long, device=self.device)
        for b in live:
            o = self.rows[b].options
            tokens[b] = sample_tokens(logits[b : b + 1], o.temperature, o.top_k, o.top_p, self.generators[b])[0][0]
        return tokens

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
    """The diffusion Engine's request-queue API for a causal model, so the server serves AR twins too.

    Continuous batching: waiting requests start together as one ARBatch of `max_batch` places, and later
    ones join it as places free up (in arrival order), as long as their prompt fits before the batch's next
    slot and their answer within the context. Otherwise they wait, at the latest for the batch to end."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_queue: int = 64):
        if layout_for(model.config).diffusion:
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

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.max_batch, self.num_active, len(self._waiting))

    def submit(self, request: DecodeRequest | CanvasRequest | list[int], options: DecodeOptions | None = None,
               request_id: str | None = None, **fields) -> str:
        """Queue a DecodeRequest (or build one: `submit(prompt_ids, options, ...)`)."""
        request = as_request(request, options, request_id, **fields)
        if isinstance(request, CanvasRequest):
            raise OptionsError("edits (masks in a canvas) need a diffusion model; this one is autoregressive")
        if request.suffix_ids:
            raise OptionsError("infilling (a suffix) needs a diffusion model; this one is autoregressive")
        if not request.prompt_ids:
            raise OptionsError("AR decoding needs at least one prompt token")
        running = [rid for b, rid in enumerate(self._ids) if self._batch is not None and self._batch.rows[b].live]
        check_submit(request, self.config, [rid for rid, _ in self._waiting], running, self.max_queue)
        bias_vector(request.options.logit_bias, self.config.vocab_size, "cpu")  # a bad token id fails here
        rid = request.request_id if request.request_id is not None else f"req-{next(self._counter)}"
        self._waiting.append((rid, ARRow(list(request.prompt_ids), request.options, request.first_allowed, True,
                                         request.stop_when)))
        return rid

    def cancel(self, request_id: str) -> None:
        self._waiting = deque(w for w in self._waiting if w[0] != request_id)
        b = self._running(request_id)
        if b is not None:
            self._batch.cancel(b)

    def _running(self, request_id: str) -> int | None:
        """The place of a request decoding now (an ended row keeps its id until the place is reused)."""
        if self._batch is None:
            return None
        return next((b for b, rid in enumerate(self._ids) if rid == request_id and self._batch.rows[b].live), None)

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        if (self._batch is None or self._batch.done) and self._waiting:
            taken = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            self._ids = [rid for rid, _ in taken] + [""] * (self.max_batch - len(taken))
            self._batch = ARBatch(self.model, [row for _, row in taken], capacity=self.max_batch)
        while self._waiting and self._batch.can_join(self._waiting[0][1]):
            rid, row = self._waiting.popleft()
            self._ids[self._batch.join(row)] = rid
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
