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

The engine itself is the loop: admission (queue, batch rows), one step, cancellation. Step 1 is the runner's
(decoding/runner.py: forward passes, K/V cache, compiled shapes, prefix-store fills), steps 2-5 are each
request's own (decoding/request.py: Request.update), and what depends on the model's attention mode is asked
of its layout (decoding/layout.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from typing import Any, Callable, Iterator

import torch

from unmask.decoding.contract import QueueFull  # noqa: F401 (imported from here too)
from unmask.decoding.contract import CanvasRequest, Capacity, DecodeRequest, as_request, check_submit
from unmask.decoding.drafts import drafts_for
from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.decoding.plan import make_plan, plan_blocks  # noqa: F401 (plan_blocks: imported from here too)
from unmask.decoding.policies import make_policy
from unmask.decoding.prefix import PrefixStore
from unmask.decoding.result import GenerationResult
from unmask.decoding.processors import processors_for
from unmask.decoding.request import Request
from unmask.decoding.runner import Runner, kv_bucket  # noqa: F401 (kv_bucket: imported from here too)
from unmask.model.transformer import Transformer

log = logging.getLogger(__name__)


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
        self._waiting: deque[Request] = deque()
        self._active: dict[str, Request] = {}
        self._ids = itertools.count()
        self._compiled = bool(compile)
        if (prefix_blocks or prefix_store is not None) and (not self.layout.prefix_reuse or compile):
            raise OptionsError("prefix reuse needs a block_causal model (only there are finished blocks' K/V "
                               "exact) and an uncompiled engine")
        if prefix_store is None and prefix_blocks > 0:
            prefix_store = PrefixStore(prefix_blocks, model.config.block_size)
        self.runner = Runner(model, max_batch, compile, prefix_store)

    @property
    def prefix(self) -> PrefixStore | None:
        return self.runner.prefix

    @property
    def cache(self):
        """The K/V cache the runner decodes in (None before the first step)."""
        return self.runner.cache

    @property
    def _forward(self) -> Callable:
        return self.runner.forward

    @_forward.setter
    def _forward(self, forward: Callable) -> None:  # benchmarks wrap it to count calls
        self.runner.forward = forward

    # ---- queue API -------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.max_batch, len(self._active), len(self._waiting))

    def submit(self, request: DecodeRequest | CanvasRequest | list[int], options: DecodeOptions | None = None,
               request_id: str | None = None, **fields: Any) -> str:
        """Queue a generation (DecodeRequest: canvas = prompt + max_new_tokens masks + suffix) or an edit's
        canvas (CanvasRequest); `submit(prompt_ids, options, ...)` builds the DecodeRequest."""
        request = as_request(request, options, request_id, **fields)
        if isinstance(request, CanvasRequest):
            return self.submit_canvas(request.canvas, request.options, request.request_id, banned=request.banned)
        check_submit(request, self.config, [r.id for r in self._waiting], list(self._active), self.max_queue)
        n, lo = request.options.max_new_tokens, len(request.prompt_ids)
        canvas = list(request.prompt_ids) + [self.config.mask_id] * n + list(request.suffix_ids)
        return self.submit_canvas(canvas, request.options, request.request_id, region=(lo, lo + n), cut_at_eos=True,
                                  stop_when=request.stop_when, first_allowed=request.first_allowed)

    def submit_canvas(self, canvas: list[int], options: DecodeOptions, request_id: str | None = None,
                      region: tuple[int, int] | None = None, cut_at_eos: bool = False,
                      stop_when: Callable[[list[int]], bool] | None = None,
                      first_allowed: torch.Tensor | None = None, banned: set[int] | None = None) -> str:
        """Queue any canvas: every mask is filled, everything else is context. Events and the result
        report canvas[region] (default: the whole canvas). `banned` token ids are never written by this
        request (their logits are -inf for it alone; other requests in the batch may write them)."""
        check_submit(CanvasRequest(list(canvas), options, set(banned or ()), request_id), self.config,
                     [r.id for r in self._waiting], list(self._active), self.max_queue)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return self._queue(rid, list(canvas), options, region, cut_at_eos, stop_when, first_allowed, banned)

    def _queue(self, request_id: str, canvas: list[int], options: DecodeOptions,
               region: tuple[int, int] | None = None, cut_at_eos: bool = False,
               stop_when: Callable[[list[int]], bool] | None = None,
               first_allowed: torch.Tensor | None = None, banned: set[int] | None = None) -> str:
        """The request's plan (blocks, region) and state, into the waiting queue (checked already)."""
        c = self.config
        plan = make_plan(canvas, options, c, self.layout, self._compiled, region, cut_at_eos, stop_when)
        x = torch.tensor(canvas, device=self.device)
        generated = x == c.mask_id
        policy = make_policy(options)
        if policy.drafts and not self.layout.drafting:
            raise OptionsError(f"the {policy.name} policy needs a model with causal attention inside its blocks and "
                               "shifted logits (an adapted AR model), where a token read from committed text is "
                               "the AR base's own")
        req = Request(
            id=request_id, options=options, config=c, layout=self.layout, static_shapes=self._compiled, x=x,
            plan=plan, generated=generated,
            processors=processors_for(
                options, c.vocab_size, self.device, banned=self._token_set(banned), canvas=x,
                generated=generated, mask_id=c.mask_id,
                # healing restricts the answer's first token: the first block's first position, if it is that
                first_allowed=None if first_allowed is None or not plan.blocks
                or plan.blocks[0][0] != plan.region[0] else first_allowed.to(self.device)),
            policy=policy, drafts=drafts_for(policy.drafts, x),
            generator=torch.Generator().manual_seed(options.seed) if options.seed is not None else None,
            host=list(canvas),
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
        `request`: DecodeRequest's stop_when / first_allowed."""
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
        for r in [r for r in self._active.values() if not r.plan.blocks]:  # nothing masked: done at once
            del self._active[r.id]
            events.append(r.finish())
        reqs = sorted(self._active.values(), key=lambda r: r.slot.row)
        if not reqs:
            return events
        logits = self.runner.logits(reqs)
        for i, r in enumerate(reqs):
            event = r.update(logits[i, : r.pos.numel()])
            if event.done:
                del self._active[r.id]
            events.append(event)
        return events

    def _admit(self) -> None:
        free = sorted(set(range(self.max_batch)) - {r.slot.row for r in self._active.values()})
        while self._waiting and free:
            r = self._waiting.popleft()
            r.slot.row, r.t0 = free.pop(0), time.perf_counter()
            self._active[r.id] = r
            r.start()
            self.runner.admit(r)

