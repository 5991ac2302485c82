"""The decoding engine: a request queue, a batch of active requests, one denoising step at a time.

Contract: the engine works on token ids and knows nothing about text. A request is a *canvas* — prompt,
masks, optional suffix (or masks anywhere, for edits) — and is decoded block by block: each block is up
to `block_length` consecutive masked positions (for block_causal models, never crossing a model block, so
the cache of finished blocks is exact). Every `step()` admits waiting requests into free batch rows, runs
one forward pass for all active requests together, lets each request's policy commit tokens, and returns
one StepEvent per active request. Requests finish on their own (all blocks done, or EOS early stop).

Stop strings are text, and the engine knows only ids, so a generation may carry `stop_when(tokens) -> bool`:
after each finished block it is asked about the committed prefix of the answer, and True ends the request
there ("stop"), like EOS does; the caller cuts the text at the stop string.

Per step and request, in order:
  1. forward   refresh (whole canvas, rewrites the row's K/V) at a block's first step, every
               `cache_refresh` steps, or always with cache="none"; otherwise only the block's window
               against the cached rest (cache.py explains the layout). block_causal models refresh only
               for their first block: a finished block's K/V are final once recomputed with its last
               tokens, so a later block's first step widens its window back over the block before it
  2. sample    tokens + confidence for the block's positions, through the request's logits processors
               (decoding/processors.py: banned tokens, healing, logit bias, penalties, temperature / top-k /
               top-p), seeded
  3. correct   (self_correct, after the block's masks are filled) rewrite confident changes, re-mask
               improbable tokens; at most `max_correction_steps` such steps per block
  4. commit    the policy picks which masked positions take their proposed token
  5. report    one host sync per request: the canvas comes back for the event and the bookkeeping (with
               options.logprobs, a second one brings the log-probabilities of the tokens just committed)

Batched greedy decoding gives the same tokens as decoding each request alone: every row keeps its own
natural-order positions, its own refresh schedule and its own random generator.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from unmask.decoding.cache import CacheView, attention_mask, grow_cache
from unmask.decoding.drafts import copy_draft
from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.policies import Policy, confidence, make_policy
from unmask.decoding.prefix import PrefixStore
from unmask.decoding.result import GenerationResult
from unmask.decoding.processors import Processors, processors_for, without_token
from unmask.decoding.sampling import TokenLogprob, choose_tokens, token_logprobs
from unmask.errors import UnmaskError
from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)


class QueueFull(UnmaskError):
    """The engine's waiting queue is at max_queue (the server answers 429)."""


def plan_blocks(mask_positions: list[int], block_length: int, config: ModelConfig) -> list[list[int]]:
    """Split masked positions into blocks of at most `block_length` consecutive masked positions.
    For block_causal models a block never crosses a model block boundary."""
    blocks: list[list[int]] = []
    layout = layout_for(config)
    for p in mask_positions:
        cur = blocks[-1] if blocks else None
        if cur is not None and len(cur) < block_length and layout.aligned(cur[0], p):
            cur.append(p)
        else:
            blocks.append([p])
    return blocks


def kv_bucket(n: int, max_seq_len: int, smallest: int = 128) -> int:
    """The key/value length a compiled engine attends over for canvases of up to `n` tokens: the next power
    of two (at least `smallest`, at most the context). Graphs are compiled per shape, so prompts of any
    length share a handful of them instead of compiling one per length (dynamo gives up after 8 and
    falls back to eager); the padded keys are masked out."""
    bucket = smallest
    while bucket < n:
        bucket *= 2
    return max(n, min(bucket, max_seq_len))


@dataclass
class Request:
    """One request's canvas and progress. Engine-internal; callers see StepEvents and GenerationResults."""

    id: str
    options: DecodeOptions
    x: torch.Tensor  # [n] canvas on the model's device
    region: tuple[int, int]  # what events and the result report: x[lo:hi]
    generated: torch.Tensor  # [n] bool: positions that started masked (only these may be corrected)
    blocks: list[list[int]]
    tail_start: int | None  # first position of a masked run reaching the canvas end (early stop applies there)
    cut_at_eos: bool  # generation: the result ends at the first EOS
    stop_when: Callable[[list[int]], bool] | None  # generation: True for a committed prefix = stop here
    processors: Processors  # its logits processors: banned tokens, healing, bias, penalties, sampling
    prompt_tokens: int
    policy: Policy
    generator: torch.Generator | None
    steps_budget: int  # per block, for the fixed policy
    row: int = -1
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
    # per-block device tensors, set by Engine._enter_block
    pos: torch.Tensor | None = None  # the block's positions
    src: torch.Tensor | None = None  # where each position's logit is read (position - 1 for logits_shift)
    window: tuple[int, int] = (0, 0)  # slots a window step recomputes
    entry_window: tuple[int, int] | None = None  # block_causal, later blocks: the first step's window
    visible: int = 0  # slots [0, visible) can influence the block: a refresh recomputes only those
    window_width: int = 0  # compiled engines pad every window of the request to this width
    entry_width: int = 0  # ... and every entry window to this one
    prefix_fill: list | None = None  # stored K/V of its leading prompt blocks, copied in before its first pass
    prefix_new: range = range(0)  # its prompt's model blocks to store after its first pass
    feed: torch.Tensor | None = None  # drafting policies (verify): the canvas as fed, drafts at open positions
    follows: torch.Tensor | None = None  # ... bool [L]: block position i is the canvas position after i - 1

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def inputs(self) -> torch.Tensor:
        """What the forward pass reads: the canvas, or with a drafting policy the canvas with its drafts."""
        return self.x if self.feed is None else self.feed

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


class Engine:
    """Batched, cached masked-diffusion decoding with a request queue.

    model       a Transformer (bidirectional or block_causal; causal twins decode with decoding/ar.py)
    max_batch   requests decoded together in one forward pass
    max_queue   waiting requests beyond which submit() raises QueueFull
    compile     torch.compile the forward passes: True (CUDA graphs, "reduce-overhead", on a GPU; plain
                inductor on a CPU) or a torch.compile mode ("default", "max-autotune", ...); window
                shapes are static per request, so graphs are reused across steps and blocks
    prefix_blocks  block_causal models, uncompiled: keep the K/V of up to this many finished prompt model
                blocks across requests (decoding/prefix.py); a request whose canvas starts with stored
                blocks copies them in and computes only from the first new one
    prefix_store   ... or use this PrefixStore, shared with other engines of the same model (edits)
    """

    def __init__(self, model: Transformer, max_batch: int = 8, max_queue: int = 64, compile: bool | str = False,
                 prefix_blocks: int = 0, prefix_store: PrefixStore | None = None):
        self.layout = layout_for(model.config)
        if not self.layout.diffusion:
            raise OptionsError("the diffusion engine needs a bidirectional or block_causal model; "
                               "causal models decode with ar_generate")
        if max_batch < 1 or max_queue < 0:
            raise OptionsError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model = model
        self.config = model.config
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device = model.output.weight.device
        self.cache = None
        self._waiting: deque[Request] = deque()
        self._active: dict[str, Request] = {}
        self._ids = itertools.count()
        self._memo: dict[str, tuple] = {}
        self._forward: Callable = model
        self._compiled = bool(compile)
        if (prefix_blocks or prefix_store is not None) and (not self.layout.prefix_reuse or compile):
            raise OptionsError("prefix reuse needs a block_causal model (only there are finished blocks' K/V "
                               "exact) and an uncompiled engine")
        if prefix_store is None and prefix_blocks > 0:
            prefix_store = PrefixStore(prefix_blocks, model.config.block_size)
        self.prefix = prefix_store
        if compile:
            # on a GPU a 32-token window step is hundreds of small kernels: without CUDA graphs
            # ("reduce-overhead") it is bound by their launches, not by the weight reads
            mode = compile if isinstance(compile, str) else ("reduce-overhead" if self.device.type == "cuda" else None)
            self._forward = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    # ---- queue API -------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def submit(self, prompt_ids: list[int], options: DecodeOptions, request_id: str | None = None,
               suffix_ids: list[int] | None = None, stop_when: Callable[[list[int]], bool] | None = None,
               first_allowed: torch.Tensor | None = None) -> str:
        """Queue a generation: canvas = prompt + max_new_tokens masks (+ suffix: infilling).
        `stop_when(answer_prefix_ids)` True after a block ends the request there (stop strings);
        `first_allowed` (bool [vocab]) restricts the first new token (token healing, decoding/healing.py)."""
        prompt_ids, suffix_ids = list(prompt_ids), list(suffix_ids or [])
        if self.config.mask_id in prompt_ids or self.config.mask_id in suffix_ids:
            raise OptionsError("prompt and suffix must not contain the mask token")
        canvas = prompt_ids + [self.config.mask_id] * options.max_new_tokens + suffix_ids
        lo = len(prompt_ids)
        return self.submit_canvas(canvas, options, request_id, region=(lo, lo + options.max_new_tokens),
                                  cut_at_eos=True, stop_when=stop_when, first_allowed=first_allowed)

    def submit_canvas(self, canvas: list[int], options: DecodeOptions, request_id: str | None = None,
                      region: tuple[int, int] | None = None, cut_at_eos: bool = False,
                      stop_when: Callable[[list[int]], bool] | None = None,
                      first_allowed: torch.Tensor | None = None, banned: set[int] | None = None) -> str:
        """Queue any canvas: every mask is filled, everything else is context. Events and the result
        report canvas[region] (default: the whole canvas). `banned` token ids are never written by this
        request (their logits are -inf for it alone; other requests in the batch may write them)."""
        c = self.config
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"queue full: {len(self._waiting)} requests waiting (max_queue {self.max_queue})")
        if not canvas:
            raise OptionsError("empty canvas: nothing to decode")
        if len(canvas) > c.max_seq_len:
            raise OptionsError(f"canvas of {len(canvas)} tokens exceeds the model context of {c.max_seq_len} tokens")
        if min(canvas) < 0 or max(canvas) >= c.vocab_size:
            raise OptionsError(f"token ids must be in [0, {c.vocab_size})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._active or any(r.id == request_id for r in self._waiting):
            raise OptionsError(f"request id {request_id!r} is already in use")
        masks = [i for i, t in enumerate(canvas) if t == c.mask_id]
        blocks = plan_blocks(masks, options.block_length, c)
        tail_start = None
        if masks and masks[-1] == len(canvas) - 1:
            tail_start = masks[-1]
            while tail_start - 1 >= 0 and canvas[tail_start - 1] == c.mask_id:
                tail_start -= 1
        total_steps = options.steps or len(masks)
        x = torch.tensor(canvas, device=self.device)
        generated = x == c.mask_id
        policy = make_policy(options)
        if policy.drafts and not self.layout.drafting:
            raise OptionsError(f"the {policy.name} policy needs a model with causal attention inside its blocks and "
                               "shifted logits (an adapted AR model), where a token read from committed text is "
                               "the AR base's own")
        req = Request(
            id=request_id, options=options, x=x, region=region or (0, len(canvas)), generated=generated,
            blocks=blocks, tail_start=tail_start, cut_at_eos=cut_at_eos, stop_when=stop_when,
            processors=processors_for(
                options, c.vocab_size, self.device, banned=self._token_set(banned), canvas=x,
                generated=generated, mask_id=c.mask_id,
                # healing restricts the answer's first token: the first block's first position, if it is that
                first_allowed=None if first_allowed is None or not blocks or blocks[0][0] != (region or (0,))[0]
                else first_allowed.to(self.device)),
            prompt_tokens=(region or (0, 0))[0], policy=policy, feed=x.clone() if policy.drafts else None,
            generator=torch.Generator().manual_seed(options.seed) if options.seed is not None else None,
            steps_budget=max(1, -(-total_steps // max(len(blocks), 1))), host=list(canvas),
        )
        self._waiting.append(req)
        return request_id

    def _token_set(self, ids: set[int] | None) -> torch.Tensor | None:
        """Token ids as a bool [vocab] mask on the device (None: no restriction)."""
        if not ids:
            return None
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise OptionsError(f"banned token ids must be in [0, {self.config.vocab_size})")
        mask = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=self.device)
        mask[torch.tensor(sorted(ids), device=self.device)] = True
        return mask

    def cancel(self, request_id: str) -> None:
        """Drop a request, queued or active. Unknown ids (already finished) are ignored."""
        self._active.pop(request_id, None)
        self._waiting = deque(r for r in self._waiting if r.id != request_id)

    # ---- convenience: one request, run to completion -----------------------------------------------------
    def stream(self, prompt_ids: list[int], options: DecodeOptions, suffix_ids: list[int] | None = None,
               **request: Any) -> Iterator[StepEvent]:
        """Submit one generation and yield its StepEvents until the final one (done=True).
        `request`: submit's stop_when / first_allowed."""
        rid = self.submit(prompt_ids, options, suffix_ids=suffix_ids, **request)
        yield from self.run(rid)

    def generate(self, prompt_ids: list[int], options: DecodeOptions, on_step: Callable[[StepEvent], None] | None = None,
                 suffix_ids: list[int] | None = None, **request: Any) -> GenerationResult:
        event = None
        for event in self.stream(prompt_ids, options, suffix_ids, **request):
            if on_step is not None:
                on_step(event)
        return event.result

    def run(self, request_id: str) -> Iterator[StepEvent]:
        """Step the engine until `request_id` is done, yielding its events (other requests advance too)."""
        while True:
            for ev in self.step():
                if ev.request_id == request_id:
                    yield ev
                    if ev.done:
                        return

    # ---- the step ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        self._admit()
        events = []
        for r in [r for r in self._active.values() if not r.blocks]:  # nothing masked: done at once
            events.append(self._finish(r))
        reqs = sorted(self._active.values(), key=lambda r: r.row)
        if not reqs:
            return events
        C = max(r.n for r in reqs)
        if self._compiled:
            C = kv_bucket(C, self.config.max_seq_len)
        cache = grow_cache(self.model, self.cache, self.max_batch, C + 1)  # +1: scratch slot for padding
        if cache is not self.cache and self._compiled:
            # The forward writes K/V in place; CUDA graphs only replay over inputs at fixed addresses,
            # so the buffers are declared static (as parameters are) instead of making cudagraphs bail out.
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        self.cache = cache
        for r in reqs:
            if r.prefix_fill:
                bs = self.config.block_size
                for j, (k, v) in enumerate(r.prefix_fill):
                    cache.k[:, r.row, :, j * bs : (j + 1) * bs] = k
                    cache.v[:, r.row, :, j * bs : (j + 1) * bs] = v
                r.prefix_fill = None
        refresh = [r for r in reqs if r.needs_refresh()]
        window = [r for r in reqs if not r.needs_refresh()]
        hidden: dict[str, torch.Tensor] = {}
        if refresh:
            hidden.update(self._refresh_forward(refresh, C))
        if window:
            hidden.update(self._window_forward(window, C))
        for r in reqs:
            if r.prefix_new:  # its first pass computed these prompt blocks: keep them for later requests
                bs = self.config.block_size
                for j in r.prefix_new:
                    self.prefix.insert(r.host, j, cache.k[:, r.row, :, j * bs : (j + 1) * bs],
                                       cache.v[:, r.row, :, j * bs : (j + 1) * bs])
                r.prefix_new = range(0)
        if len(reqs) == 1:
            h = hidden[reqs[0].id][None]
        else:
            h = torch.nn.utils.rnn.pad_sequence([hidden[r.id] for r in reqs], batch_first=True)
        logits = self.model.output(h)  # the mask token keeps its logit: _advance never proposes it
        for i, r in enumerate(reqs):
            # banned tokens first, as if the model could not say them; the reported log-probabilities are
            # the model's own distribution over what may be written: before healing, biases and penalties
            own = r.processors.restrict(logits[i, : r.pos.numel()], r.block)
            model_logprobs = None
            if r.options.logprobs is not None:
                model_logprobs = without_token(own.float(), self.config.mask_id).log_softmax(-1)
            r.nfe += 1
            events.append(self._advance(r, r.processors.adjust(own, r.block), model_logprobs))
        return events

    def _admit(self) -> None:
        free = sorted(set(range(self.max_batch)) - {r.row for r in self._active.values()})
        while self._waiting and free:
            r = self._waiting.popleft()
            r.row, r.t0 = free.pop(0), time.perf_counter()
            self._active[r.id] = r
            if r.blocks:
                self._enter_block(r)
                self._draft(r)
                if self.prefix is not None and r.options.cache != "none" and not r.options.cache_refresh:
                    self._reuse_prefix(r)

    def _reuse_prefix(self, r: Request) -> None:
        """Plan a new request's first pass around the prefix store: the stored leading model blocks of its
        canvas are copied in (step(), once the cache is sized) and its first pass starts after them, as an
        entry window; the complete model blocks before its first mask are stored after that pass."""
        bs = self.config.block_size
        complete = r.blocks[0][0] // bs  # model blocks wholly before the first masked position
        found = self.prefix.lookup(r.host, complete)
        if found:
            r.prefix_fill = found
            r.entry_window = (min(len(found) * bs, r.window[0]), r.window[1])
        r.prefix_new = range(len(found), complete)

    def _block_window(self, r: Request, blk: list[int]) -> tuple[int, int]:
        """The slots a window step over block `blk` recomputes."""
        return self.layout.block_window(blk, r.n, r.options.cache)

    def _entry_window(self, r: Request, block: int) -> tuple[int, int] | None:
        """block > 0: the first step's window (the layout's entry window), or None: that step refreshes."""
        if block == 0:
            return None
        return self.layout.entry_window(self._block_window(r, r.blocks[block]), r.blocks[block - 1])

    def _enter_block(self, r: Request) -> None:
        blk = r.blocks[r.block]
        r.pos = torch.tensor(blk, device=self.device)
        r.src = (r.pos - (1 if self.config.logits_shift else 0)).clamp_min(0)
        r.window = self._block_window(r, blk)
        r.entry_window = self._entry_window(r, r.block)
        r.visible = self.layout.visible(r.window, r.n, self._compiled)
        if self._compiled and r.block == 0:
            # one window width for all of the request's blocks (prefix windows shrink block by block):
            # compiled graphs keep their shapes instead of recompiling per block
            r.window_width = max(e - s for s, e in (self._block_window(r, b) for b in r.blocks))
            entries = [w for w in (self._entry_window(r, i) for i in range(len(r.blocks))) if w is not None]
            r.entry_width = max((e - s for s, e in entries), default=0)
        r.block_step, r.correcting = 0, -1
        r.policy.start_block(len(blk), r.steps_budget)
        if r.policy.drafts:
            r.follows = torch.ones_like(r.pos, dtype=torch.bool)
            r.follows[1:] = r.pos[1:] == r.pos[:-1] + 1

    def _draft(self, r: Request) -> None:
        """Drafting policies: where the block's first open position has no draft from the model's look-ahead,
        copy one from the committed text before it (decoding/drafts.py) over the open run there. The next
        window starts at the last committed position: every one before it was fed its own token, with only
        committed tokens before it, so its K/V are final (uncompiled engines; compiled ones keep one shape)."""
        if not r.policy.drafts:
            return
        blk, mask = r.blocks[r.block], self.config.mask_id
        fed = r.feed[r.pos].tolist()
        first = next((i for i, p in enumerate(blk) if r.host[p] == mask), None)
        if first is not None and not self._compiled:
            r.window = (max(r.window[0], blk[first] - 1), r.window[1])
        if first is None or fed[first] != mask:
            return
        run = first + 1
        while run < len(blk) and blk[run] == blk[run - 1] + 1 and r.host[blk[run]] == mask:
            run += 1
        draft = copy_draft(r.host[: blk[first]], run - first)
        if draft:
            r.feed[r.pos[first : first + len(draft)]] = torch.tensor(draft, device=self.device)

    def _rows(self, reqs: list[Request]) -> slice | torch.Tensor:
        rows = [r.row for r in reqs]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        return torch.tensor(rows, device=self.device)

    def _refresh_forward(self, reqs: list[Request], C: int) -> dict[str, torch.Tensor]:
        if not self._compiled:
            C = max(r.visible for r in reqs)
        key = ("refresh", C, tuple((r.row, r.visible) for r in reqs))
        if self._memo.get("refresh", (None,))[0] != key:
            lengths = [r.visible for r in reqs]
            positions = torch.arange(C, device=self.device).expand(len(reqs), -1)
            q_real = positions < torch.tensor(lengths, device=self.device)[:, None]
            self._memo["refresh"] = (key, positions, attention_mask(self.config, positions, q_real, lengths, C))
        _, positions, mask = self._memo["refresh"]
        if len(reqs) == 1 and reqs[0].visible == C:
            tokens = reqs[0].inputs[None, :C]
        else:
            tokens = torch.stack([F.pad(r.inputs[: r.visible], (0, C - r.visible), value=self.config.pad_id)
                                  for r in reqs])
        view = CacheView(self.cache, self._rows(reqs), None, C)
        h = self._forward(tokens, positions=positions, cache=view, cache_start=0, kv_len=C, attn_mask=mask,
                          return_hidden=True)
        return {r.id: h[i, r.src] for i, r in enumerate(reqs)}

    def _window_forward(self, reqs: list[Request], C: int) -> dict[str, torch.Tensor]:
        windows = [r.step_window() for r in reqs]
        key = ("window", C, tuple((r.row, r.visible, w) for r, w in zip(reqs, windows)))
        if self._memo.get("window", (None,))[0] != key:
            W = max(max(e - s, r.entry_width if r.entering else r.window_width) for r, (s, e) in zip(reqs, windows))
            slots = torch.full((len(reqs), W), C, device=self.device)  # padding entries -> scratch slot C
            positions = torch.zeros((len(reqs), W), dtype=torch.long, device=self.device)
            for i, (s, e) in enumerate(windows):
                slots[i, : e - s] = positions[i, : e - s] = torch.arange(s, e, device=self.device)
            q_real = slots < C
            mask = attention_mask(self.config, positions, q_real, [r.visible for r in reqs], C)
            self._memo["window"] = (key, W, positions, slots, mask)
        _, W, positions, slots, mask = self._memo["window"]
        if len(reqs) == 1 and W == windows[0][1] - windows[0][0]:
            s, e = windows[0]
            tokens = reqs[0].inputs[s:e][None]  # strides as the padded (stacked) path's: one compiled graph
        else:
            tokens = torch.stack([F.pad(r.inputs[s:e], (0, W - (e - s)), value=self.config.pad_id)
                                  for r, (s, e) in zip(reqs, windows)])
        view = CacheView(self.cache, self._rows(reqs), slots, C)
        h = self._forward(tokens, positions=positions, cache=view, cache_start=0, kv_len=C, attn_mask=mask,
                          return_hidden=True)
        # a drafting request's window may start inside its block: the rows before it are committed, unread
        return {r.id: h[i, (r.src - s).clamp_min(0)] for i, (r, (s, _)) in enumerate(zip(reqs, windows))}

    def _advance(self, r: Request, logits: torch.Tensor, model_logprobs: torch.Tensor | None) -> StepEvent:
        """Sample, correct, commit for one request's block; then bookkeeping on the host copy.
        `model_logprobs` [L, V]: the model's log-probabilities for the block, when options.logprobs is set."""
        o, c = r.options, self.config
        cur = r.x[r.pos]
        masked = cur == c.mask_id
        # tokens: float32 decision logits (temperature, top-k, top-p), never [MASK] (a committed mask would
        # never finish its block)
        choice = r.processors.decide(without_token(logits.float(), c.mask_id))
        tokens = choose_tokens(choice, o.temperature > 0, r.generator)
        # confidences as LLaDA's and Fast-dLLM's samplers compute them: a float64 softmax of all the logits,
        # the mask's share of the mass included (float32 rounds near-ties together and commits elsewhere)
        probs = r.processors.decide(logits.double()).softmax(-1)
        conf = confidence(o.confidence, probs, tokens, r.generator)
        new = cur
        last_correction = False
        if r.correcting >= 0:
            last_correction = r.correcting + 1 >= o.max_correction_steps
            new = self._correct(r, cur, without_token(probs, c.mask_id, 0.0), allow_remask=not last_correction)
        if last_correction:
            commit = masked  # the bound: whatever is still masked is committed now
        elif r.policy.drafts:
            fed = r.feed[r.pos]
            commit = r.policy.verify(tokens, cur, fed, masked, r.follows)
            still_open = masked & ~commit
            r.feed[r.pos] = torch.where(still_open, r.policy.next_inputs(tokens, fed, still_open, r.follows, c.mask_id),
                                        torch.where(commit, tokens, cur))
        else:
            commit = r.policy.select(conf, masked, r.block_step)
        new = torch.where(commit, tokens, new)
        r.x[r.pos] = new
        r.steps += 1
        r.block_step += 1
        if r.correcting >= 0:
            r.correcting += 1

        # one host sync per request and step
        before, row = r.host, r.x.tolist()
        r.host = row
        blk = r.blocks[r.block]
        changed = [p for p in blk if row[p] != before[p]]
        if model_logprobs is not None and changed:
            self._record_logprobs(r, blk, new, model_logprobs, changed)
        left = sum(row[p] == c.mask_id for p in blk)
        block_done = False
        if left == 0:
            if r.correcting < 0 and o.self_correct and o.max_correction_steps > 0:
                r.correcting = 0  # masks filled: start the bounded correction post-steps
            elif r.correcting < 0 or not changed or r.correcting >= o.max_correction_steps:
                block_done = True
        if block_done:
            r.steps_per_block.append(r.block_step)
            if r.stop_when is not None and r.block + 1 < len(r.blocks) and r.stop_when(self._answer_prefix(r)):
                r.stopped_by_check = True
                return self._finish(r, changed)
            eos_in_tail = r.tail_start is not None and any(row[p] == c.eos_id for p in blk if p >= r.tail_start)
            if o.early_stop and eos_in_tail and r.block + 1 < len(r.blocks):
                rest = [p for b in r.blocks[r.block + 1 :] for p in b]
                r.x[torch.tensor(rest, device=self.device)] = c.eos_id
                for p in rest:
                    row[p] = c.eos_id
                r.stopped_at_eos = True
                return self._finish(r, changed)
            r.block += 1
            if r.block == len(r.blocks):
                return self._finish(r, changed)
            self._enter_block(r)
        self._draft(r)
        lo, hi = r.region
        return StepEvent(r.id, r.steps, row[lo:hi], sum(t != c.mask_id for t in row[lo:hi]),
                         changed=[p - lo for p in changed if lo <= p < hi], logprobs=self._region_logprobs(r))

    def _record_logprobs(self, r: Request, blk: list[int], new: torch.Tensor, model_logprobs: torch.Tensor,
                         changed: list[int]) -> None:
        """Keep the log-probability (and top alternatives) of each token this step committed or rewrote, as
        the model gave it at this step; a re-masked position forgets its entry until it is committed again."""
        at = {p: i for i, p in enumerate(blk)}
        idx = torch.tensor([at[p] for p in changed], device=new.device)
        entries = token_logprobs(model_logprobs[idx], new[idx], r.options.logprobs)
        for p, entry in zip(changed, entries):
            if r.host[p] == self.config.mask_id:
                r.logprob_of.pop(p, None)
            else:
                r.logprob_of[p] = entry

    def _region_logprobs(self, r: Request) -> list[TokenLogprob | None] | None:
        if r.options.logprobs is None:
            return None
        return [r.logprob_of.get(p) for p in range(*r.region)]

    def _answer_prefix(self, r: Request) -> list[int]:
        """The committed tokens of the region up to its first mask (or EOS): text that can no longer change."""
        lo, hi = r.region
        out = []
        for t in r.host[lo:hi]:
            if t == self.config.mask_id or (r.cut_at_eos and t == self.config.eos_id):
                break
            out.append(t)
        return out

    def _correct(self, r: Request, cur: torch.Tensor, probs: torch.Tensor, allow_remask: bool) -> torch.Tensor:
        """Self-correction on the block's generated tokens: rewrite where the model now prefers another
        token with probability >= rewrite_above; re-mask where the current token's probability < remask_below."""
        o, c = r.options, self.config
        committed = r.generated[r.pos] & (cur != c.mask_id)
        p_best, best = probs.max(-1)
        p_cur = probs.gather(-1, cur.clamp(0, probs.shape[-1] - 1)[:, None]).squeeze(-1)
        rewrite = committed & (best != cur) & (p_best >= o.rewrite_above)
        new = torch.where(rewrite, best, cur)
        if allow_remask:
            remask = committed & ~rewrite & (p_cur < o.remask_below)
            new = torch.where(remask, torch.full_like(new, c.mask_id), new)
        return new

    def _finish(self, r: Request, changed: list[int] | None = None) -> StepEvent:
        self._active.pop(r.id, None)
        c = self.config
        lo, hi = r.region
        region = r.host[lo:hi] if r.host else r.x[lo:hi].tolist()
        tokens, finish = region, "length"
        if r.stopped_by_check:
            tokens, finish = self._answer_prefix(r), "stop"
        elif r.cut_at_eos and c.eos_id in region:
            tokens, finish = region[: region.index(c.eos_id)], "eos"
        elif r.stopped_at_eos:
            finish = "eos"
        result = GenerationResult(tokens=tokens, nfe=r.nfe, steps=r.steps, steps_per_block=list(r.steps_per_block),
                                  seconds=time.perf_counter() - r.t0, finish_reason=finish,
                                  prompt_tokens=r.prompt_tokens)
        logprobs = self._region_logprobs(r)
        if logprobs is not None:  # context tokens of an edited canvas were never committed: None, []
            entries = logprobs[: len(tokens)]
            result.logprobs = [e[0] if e else None for e in entries]
            result.top_logprobs = [e[1] if e else [] for e in entries]
        return StepEvent(r.id, r.steps, region, sum(t != c.mask_id for t in region), done=True, result=result,
                         changed=[p - lo for p in (changed or []) if lo <= p < hi], logprobs=logprobs)
