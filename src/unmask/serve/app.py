"""The OpenAI-compatible HTTP server: a thin translation of requests into engine calls (vLLM's split).

`create_app(pipeline)` returns a FastAPI app with
  GET  /v1/models, GET /v1/models/{id}, GET /v1/policies, POST /v1/completions (with `suffix` = infilling),
  POST /v1/chat/completions, POST /v1/edits (Instant Edit), GET /health, GET /metrics (Prometheus), and the
  demo page at `/`.

Streaming (`stream: true`) is Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`.
Deltas carry the committed prefix of the text as it grows. With `diffusing: true` every chunk instead
carries the WHOLE current text, each still-masked position shown as MASK_PLACEHOLDER ("░"), plus a
`diffusion` object per choice (step, masked count, per-position pieces) — each chunk replaces the last.
`usage` adds our figures to OpenAI's token counts: nfe, steps, tokens_per_step, seconds.

All model work runs on one worker thread (serve/worker.py); a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from unmask.chat import end_of_turn_strings
from unmask.decoding.contract import DecodeRequest, QueueFull
from unmask.decoding.events import StepEvent
from unmask.decoding.layout import layout_for
from unmask.decoding.generate import stop_checker
from unmask.decoding.healing import heal
from unmask.decoding.options import DecodeOptions
from unmask.decoding.policies import POLICIES, declared_params
from unmask.edit.spans import has_markers
from unmask.errors import UnmaskError
from unmask.serve.logprobs import LogprobFormat
from unmask.serve.metrics import Metrics
from unmask.serve.scheduler import retry_headers
from unmask.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DecodingFields,
    EditRequest,
    ServerLimits,
    check_limits,
)
from unmask.serve.text import MASK_PLACEHOLDER, DeltaStream, committed_prefix, final_text, render_canvas, tokens_for_text
from unmask.serve.commands import Abort, JobDone, RefuseWaiting
from unmask.serve.worker import Worker
from unmask.tokenizer import USER

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class ClientGone(Exception):
    pass


@dataclass
class Choice:
    """One answer of a response: prompt i's sample j is choice i * n + j (OpenAI's order)."""
    index: int
    prompt_ids: list[int]  # healed: without the re-decoded last token
    suffix_ids: list[int] | None
    opts: DecodeOptions
    n_prompt: int  # prompt (+ suffix) tokens for usage: counted on a prompt's first choice only
    skip: str = ""  # healed text the answer starts with
    first_allowed: Any = None
    echo: str = ""  # the prompt's text, put before the answer (completions' `echo`)


@dataclass
class Final:
    choice: Choice
    result: Any  # GenerationResult
    tokens: list[int]  # those that make the answer's text (cut at EOS and stop strings)

    @property
    def completion_tokens(self) -> int:
        """Tokens of new text: a healed prompt's re-decoded last token is the prompt's (in prompt_tokens)."""
        return max(len(self.tokens) - (1 if self.choice.skip else 0), 0)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def shutting_down(why: str) -> ApiError:
    return ApiError(f"server shutting down: {why}; retry on another replica or after restart", 503,
                    type="server_error")


def result_logprobs(result: Any) -> list:
    """A GenerationResult's (logprob, top alternatives) per token."""
    return list(zip(result.logprobs or [], result.top_logprobs or []))


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """State behind one app: pipeline, worker, limits, metrics; the handlers are its methods."""

    def __init__(self, pipeline: Any, engine: Any, model_name: str, limits: ServerLimits,
                 defaults: DecodeOptions, max_edit_queue: int):
        self.pipeline = pipeline
        self.tokenizer = pipeline.tokenizer
        self.config = pipeline.config
        self.layout = layout_for(pipeline.config)
        self.model_name = model_name
        self.limits = limits
        self.defaults = defaults
        self.worker = Worker(engine, max_jobs=max_edit_queue)
        self.metrics = Metrics(lambda: self.worker.num_waiting, lambda: self.worker.num_active)
        if getattr(engine, "prefix", None) is not None:  # edits' canvases are engine requests: they use it too
            self.metrics.watch_prefix_store(engine.prefix)
        self.created = int(time.time())
        self.stopping = False  # shutdown has begun: new requests are refused (503)
        # strings that end an assistant turn: the checkpoint's end-of-turn tokens, or the start of a new turn
        self.turn_ends = end_of_turn_strings(pipeline)
        if self.tokenizer.token_to_id(USER) is not None:
            self.turn_ends.append(USER)
        # EOS/pad inside an edited span are absorbed (dropped) by the edit: show them as nothing
        self.absorbed = frozenset(i for i in (self.config.eos_id, self.config.pad_id) if i is not None)

    # --- shutdown ----------------------------------------------------------------------------------
    def begin_shutdown(self, timeout: float) -> None:
        """The server is told to stop (SIGTERM): new requests and those still waiting for a batch row get a
        503 at once; what is decoding gets `timeout` seconds to finish, then ends with an error saying why
        (in-band for a stream). Called on the event loop, before uvicorn waits for connections to close."""
        self.stopping = True
        self.worker.post(RefuseWaiting(shutting_down("the request had not started")))
        asyncio.get_running_loop().call_later(
            timeout, self.worker.post, Abort(shutting_down(f"the request was cancelled after the {timeout:g} s "
                                                           "shutdown timeout")))

    def refuse_if_stopping(self) -> None:
        if self.stopping:
            raise shutting_down("no new requests are taken")

    # --- request checks ----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        """A 404 for a model this server does not serve (none named: the one it serves)."""
        if model == "":
            raise ApiError(f"model: empty; name the served model '{self.model_name}' or leave the field out", 400,
                           "model")
        if model not in (None, self.model_name):
            raise ApiError(f"model: '{model}' does not exist; this server serves '{self.model_name}'", 404,
                           "model", type="not_found_error")

    def model_card(self) -> dict:
        """The served model as /v1/models lists it: OpenAI's fields, then ours."""
        c, d = self.config, self.defaults
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "unmask",
                "max_model_len": c.max_seq_len, "attention": self.layout.name, "mask_placeholder": MASK_PLACEHOLDER,
                "max_tokens_limit": min(self.limits.max_tokens, c.max_seq_len),
                "defaults": {"max_tokens": d.max_new_tokens, "block_length": d.block_length, "policy": d.policy,
                             **{name: d.param(name) for name in declared_params()}}}

    def policies(self) -> dict:
        """The registered policies with their knobs (name, type, range, help); each knob's `default` is this
        server's (the model's generation_config.json over the declared default)."""
        data = [cls.describe() for cls in POLICIES.values()]
        for policy in data:
            for knob in policy["params"]:
                knob["default"] = self.defaults.param(knob["name"])
        return {"object": "list", "data": data, "default": self.defaults.policy}

    def encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.limits.max_prompt_chars:
            raise ApiError(f"{param}: {len(text)} characters is above the limit of {self.limits.max_prompt_chars}",
                           400, param)
        ids = self.tokenizer.encode(text)
        self.check_ids(ids, param)
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.config.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(f"{param}: token id {bad} is outside the vocabulary (0..{vocab - 1})", 400, param)
        if self.config.mask_id in ids:
            raise ApiError(f"{param}: contains the mask token; use `suffix` to infill or /v1/edits to edit", 400,
                           param)

    def options(self, req: DecodingFields, n_context: int, prompt_field: str = "prompt") -> DecodeOptions:
        """The request's decoding options; errors name the field the client sent (`prompt_field`: where the
        context came from)."""
        ctx = self.config.max_seq_len
        check_limits(req, self.limits, ctx, self.config.vocab_size)
        try:
            opts = req.decode_options(self.defaults)
        except UnmaskError as e:
            raise ApiError(str(e), 400, option_field(str(e), req)) from None
        if n_context >= ctx:  # no room for a single new token: the prompt is what is too long
            raise ApiError(f"{prompt_field}: {n_context} tokens leave no room in the model context of {ctx} tokens",
                           400, prompt_field)
        if req.max_tokens is None and n_context + opts.max_new_tokens > ctx:
            # the default is a default: shorten it to the room the prompt leaves, as vLLM does
            opts = opts.replace(max_new_tokens=ctx - n_context)
        if n_context + opts.max_new_tokens > ctx:
            field = req.tokens_field()
            raise ApiError(f"{field}: {n_context} prompt tokens + {opts.max_new_tokens} new tokens exceed the "
                           f"model context of {ctx} tokens", 400, field)
        return opts

    # --- completions and chat ----------------------------------------------------------------------
    def prompts(self, prompt: str | list) -> list[tuple[list[int], bool]]:
        """(token ids, is text) of each prompt: a text, token ids, or a list of either (OpenAI's batch form)."""
        if isinstance(prompt, str):
            return [(self.encode(prompt, "prompt"), True)]
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [pair for p in prompt for pair in self.prompts(p)]
        ids = list(prompt)
        self.check_ids(ids, "prompt")
        return [(ids, False)]

    def samples(self, req: DecodingFields, first_index: int, prompt_ids: list[int], suffix_ids: list[int] | None,
                opts: DecodeOptions, text_prompt: bool) -> list[Choice]:
        """The request's `n` choices for one prompt. A seed gives each choice its own (seed + j)."""
        # token healing as in the pipeline: the answer's first token re-decodes the prompt's last one
        healing = heal(self.tokenizer, prompt_ids, self.config.vocab_size) \
            if text_prompt and opts.heal and not suffix_ids else None
        n_prompt = len(prompt_ids) + len(suffix_ids or [])
        ids, skip, allowed = prompt_ids, "", None
        if healing is not None:
            ids, allowed, skip = healing.prompt_ids, healing.allowed, healing.removed
            # the re-decoded token stands in for the prompt's last one: max_tokens counts the tokens after it;
            # the blocks widen to hold it, so their number (and a fixed step budget's split) stays as asked
            n, blocks = opts.max_new_tokens, -(-opts.max_new_tokens // opts.block_length)
            opts = opts.replace(max_new_tokens=n + 1, block_length=-(-(n + 1) // blocks))
        def seeded(j: int) -> DecodeOptions:  # wrapped into torch's signed 64-bit seeds
            return opts if opts.seed is None else opts.replace(seed=(opts.seed + j + 2**63) % 2**64 - 2**63)

        echo = self.tokenizer.decode(prompt_ids) if getattr(req, "echo", False) else ""
        return [Choice(first_index + j, ids, suffix_ids, seeded(j), n_prompt if j == 0 else 0, skip, allowed, echo)
                for j in range(req.n)]

    def check_choices(self, req: DecodingFields, n_prompts: int) -> None:
        if n_prompts * req.n > self.limits.max_choices:
            raise ApiError(f"n: {n_prompts} prompt(s) x n={req.n} is more than this server's "
                           f"{self.limits.max_choices} choices per request", 400, "n")

    async def completion(self, request: Request, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        prompts = self.prompts(req.prompt)
        self.check_choices(req, len(prompts))
        suffix_ids = self.encode(req.suffix, "suffix") if req.suffix else None
        if suffix_ids is not None and not self.layout.diffusion:
            raise ApiError("suffix: infilling needs a diffusion model; this one is autoregressive", 400, "suffix")
        choices = []
        for i, (prompt_ids, text_prompt) in enumerate(prompts):
            if not prompt_ids and not suffix_ids:
                raise ApiError("prompt: empty; give some text (or a suffix to infill before)", 400, "prompt")
            opts = self.options(req, len(prompt_ids) + len(suffix_ids or []), "prompt")
            choices += self.samples(req, i * req.n, prompt_ids, suffix_ids, opts, text_prompt)
        return await self.run(request, req, "/v1/completions", choices, chat=False)

    async def chat(self, request: Request, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        self.check_choices(req, 1)
        if len(req.messages) > self.limits.max_messages:
            raise ApiError(f"messages: at most {self.limits.max_messages} messages", 400, "messages")
        chars = sum(len(m.content) for m in req.messages)
        if chars > self.limits.max_prompt_chars:
            raise ApiError(f"messages: {chars} characters is above the limit of {self.limits.max_prompt_chars}",
                           400, "messages")
        prompt = self.chat_prompt(req)
        prompt_ids = self.tokenizer.encode(prompt)
        self.check_ids(prompt_ids, "messages")
        opts = self.options(req, len(prompt_ids), "messages")
        # a model may close its turn with an end-of-turn token or open the next turn: both end the answer
        opts = opts.replace(stop=opts.stop + [t for t in self.turn_ends if t not in opts.stop])
        return await self.run(request, req, "/v1/chat/completions", self.samples(req, 0, prompt_ids, None, opts, True),
                              chat=True)

    def chat_prompt(self, req: ChatCompletionRequest) -> str:
        """The messages rendered by the checkpoint's chat template, with the client's template variables."""
        try:
            return self.tokenizer.apply_chat_template([m.model_dump() for m in req.messages],
                                                      add_generation_prompt=True, **(req.chat_template_kwargs or {}))
        except UnmaskError as e:
            raise ApiError(f"messages: {e}", 400, "messages") from None
        except TypeError as e:  # a variable the renderer sets itself ("got multiple values for keyword ...")
            raise ApiError(f"chat_template_kwargs: {e}", 400, "chat_template_kwargs") from None

    async def run(self, request: Request, req: DecodingFields, endpoint: str, choices: list[Choice],
                  chat: bool) -> Response:
        self.refuse_if_stopping()
        t0 = time.perf_counter()
        # all choices as one group: admitted whole or refused whole (serve/scheduler.py)
        tickets, admitted = self.worker.submit_group(
            [DecodeRequest(c.prompt_ids, c.opts, list(c.suffix_ids or []),
                           stop_when=stop_checker(self.tokenizer, c.opts.stop, c.skip), first_allowed=c.first_allowed)
             for c in choices], every_step=req.stream)
        try:
            await self.admission(request, admitted)
        except ClientGone:
            self.cancel(tickets)
            self.metrics.requests.labels(endpoint, "cancelled").inc()
            return Response(status_code=499)
        except BaseException:  # refused (queue full, bad options): none of its choices stays
            self.cancel(tickets)
            raise
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = self.stream(choices, tickets, meta, chat, req.diffusing, include_usage, endpoint, t0)
            return StreamingResponse(body, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = await asyncio.gather(*(self.wait_final(request, t) for t in tickets), return_exceptions=True)
        failed = [e for e in events if isinstance(e, BaseException)]
        if failed:
            self.cancel(tickets)
            if all(isinstance(e, ClientGone) for e in failed):
                self.metrics.requests.labels(endpoint, "cancelled").inc()
                return Response(status_code=499)
            raise next(e for e in failed if not isinstance(e, ClientGone))
        answers, finals = [], []
        for c, ev in zip(choices, events):
            text, tokens, stopped = final_text(self.tokenizer, ev.result.tokens, self.config.eos_id, c.opts.stop,
                                               c.skip)
            finals.append(Final(c, ev.result, tokens))
            finish = self.finish_reason(ev.result, stopped)
            logprobs = self.logprob_format(c, chat)
            if logprobs is not None:
                logprobs = logprobs(tokens, result_logprobs(ev.result)[: len(tokens)])
            if chat:
                answers.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish})
            else:
                answers.append({"index": c.index, "text": c.echo + text, "logprobs": logprobs, "finish_reason": finish})
        usage = self.usage(finals, t0)
        self.record(endpoint, t0, usage)
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**meta, "object": obj, "choices": answers, "usage": usage})

    def logprob_format(self, c: Choice, chat: bool) -> LogprobFormat | None:
        if c.opts.logprobs is None:
            return None
        return LogprobFormat(self.tokenizer, chat, skip=c.skip, offset=len(c.echo))

    def cancel(self, tickets: list) -> None:
        for t in tickets:
            self.worker.cancel(t.request_id)

    async def admission(self, request: Request, admitted: asyncio.Future) -> None:
        """Wait until a request's choices are in the engine: at once, unless older requests wait before it
        (then it waits whole, in arrival order); raises ClientGone if the client disconnects first."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(admitted), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None

    async def wait_final(self, request: Request, ticket) -> Any:
        """The request's last event; raises ClientGone if the client disconnects first."""
        while True:
            try:
                item = await asyncio.wait_for(ticket.next(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None
                continue
            if isinstance(item, JobDone) or (isinstance(item, StepEvent) and item.done):
                return item

    async def stream(self, choices: list[Choice], tickets: list, meta: dict, chat: bool, diffusing: bool,
                     include_usage: bool, endpoint: str, t0: float) -> AsyncIterator[str]:
        """Every choice's chunks as they come (each carries its choice index), then usage and [DONE]."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()
        ended = object()

        async def pump(c: Choice, ticket) -> None:
            try:
                async for item in self.choice_stream(c, ticket, meta, obj, chat, diffusing):
                    await merged.put(item)
            except Exception as e:  # noqa: BLE001 (handed to the response, which reports it in-band)
                await merged.put(e)
            await merged.put(ended)

        tasks = [asyncio.create_task(pump(c, t)) for c, t in zip(choices, tickets)]
        done, finals, running = False, [], len(tasks)
        try:
            while running:
                item = await merged.get()
                if item is ended:
                    running -= 1
                elif isinstance(item, Final):
                    finals.append(item)
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
            usage = self.usage(finals, t0)
            if include_usage:
                yield sse({**meta, "object": obj, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            done = True
            self.record(endpoint, t0, usage)
        except Exception as e:  # the engine refused or failed mid-way: tell the client in-band
            done = True
            self.cancel(tickets)
            self.metrics.requests.labels(endpoint, "error").inc()
            yield sse(error_body(str(e), "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            if not done:  # client went away (the response task was cancelled) or an unexpected error
                self.cancel(tickets)
                self.metrics.requests.labels(endpoint, "cancelled").inc()
                log.info("request %s cancelled: client disconnected", ", ".join(t.request_id for t in tickets))

    async def choice_stream(self, c: Choice, ticket, meta: dict, obj: str, chat: bool,
                            diffusing: bool) -> AsyncIterator[str | Final]:
        """One choice's SSE chunks, then its Final."""
        eos, mask = self.config.eos_id, self.config.mask_id
        deltas = DeltaStream(self.tokenizer, mask, eos, c.opts.stop, live=not c.opts.self_correct, skip=c.skip)
        logprobs = self.logprob_format(c, chat)
        sent = 0  # tokens whose logprobs went out: those the streamed text covers

        def chunk(text: str | None, finish: str | None = None, extra: dict | None = None, role: bool = False) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", **delta}
                choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}
            if extra:
                choice.update(extra)
            return sse({**meta, "object": obj, "choices": [choice]})

        if chat:
            yield chunk("", role=True)
        if c.echo and not diffusing:  # deltas: the prompt comes first; diffusing chunks each carry it
            yield chunk(c.echo)
        while True:
            ev: StepEvent = await ticket.next()
            if not ev.done:
                if diffusing:
                    text, pieces = render_canvas(self.tokenizer, ev.canvas, mask, eos, skip=c.skip)
                    yield chunk(c.echo + text, extra={"diffusion": self.diffusion_info(ev, pieces)})
                else:
                    delta = deltas.update(ev.canvas)
                    extra = None
                    if delta and logprobs is not None:
                        prefix = committed_prefix(ev.canvas, mask, eos)
                        covered = tokens_for_text(self.tokenizer, prefix, c.skip + deltas.sent)
                        extra = {"logprobs": logprobs(prefix[sent:covered], ev.logprobs[sent:covered])}
                        sent = covered
                    if delta:
                        yield chunk(delta, extra=extra)
                continue
            text, tokens, stopped = final_text(self.tokenizer, ev.result.tokens, eos, c.opts.stop, c.skip)
            finish = self.finish_reason(ev.result, stopped)
            rest = None
            if logprobs is not None:  # diffusing: each chunk replaces the last, so the final one has them all
                rest = {"logprobs": logprobs(tokens[sent:], result_logprobs(ev.result)[sent: len(tokens)])}
            if diffusing:
                _, pieces = render_canvas(self.tokenizer, tokens, mask, eos, skip=c.skip)
                yield chunk(c.echo + text, finish, extra={"diffusion": self.diffusion_info(ev, pieces, final=True),
                                                          **(rest or {})})
            else:
                delta = deltas.finish(text)
                if delta or rest:
                    yield chunk(delta, extra=rest)
                yield chunk(None if chat else "", finish)
            yield Final(c, ev.result, tokens)
            return

    @staticmethod
    def diffusion_info(ev: StepEvent, pieces: list[str | None], final: bool = False) -> dict:
        masked = sum(p is None for p in pieces)
        info = {"step": ev.step, "masked": masked, "total": len(pieces), "pieces": pieces,
                "changed": [i for i in ev.changed if i < len(pieces)], "final": final}
        if ev.logprobs is not None:  # with logprobs: each committed token's probability when it was committed
            info["confidence"] = [None if e is None else round(math.exp(e[0]), 4) for e in ev.logprobs[: len(pieces)]]
        return info

    @staticmethod
    def finish_reason(result: Any, stopped: bool) -> str:
        return "stop" if stopped or result.finish_reason in ("eos", "stop") else "length"

    @staticmethod
    def usage(finals: list[Final], t0: float) -> dict:
        """OpenAI's token counts (each prompt once) plus ours, summed over the choices; seconds: the one
        choice's decoding time, or the request's wall time for several."""
        n_prompt = sum(f.choice.n_prompt for f in finals)
        n_completion = sum(f.completion_tokens for f in finals)
        steps = sum(int(getattr(f.result, "steps", 0)) for f in finals)
        nfe = sum(int(getattr(f.result, "nfe", 0)) for f in finals)
        one = float(getattr(finals[0].result, "seconds", 0.0)) if len(finals) == 1 else 0.0
        seconds = one or (time.perf_counter() - t0)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
                "nfe": nfe, "steps": steps,
                "tokens_per_step": round(n_completion / max(steps, 1), 4), "seconds": round(seconds, 6)}

    def record(self, endpoint: str, t0: float, usage: dict) -> None:
        self.metrics.finished(endpoint, time.perf_counter() - t0, usage["prompt_tokens"], usage["completion_tokens"],
                              usage["nfe"], usage["steps"])

    # --- Instant Edit ------------------------------------------------------------------------------
    async def edit(self, request: Request, req: EditRequest) -> Response:
        from unmask.serve.edits import check_edit, edit_job

        self.check_model(req.model)
        if not self.layout.diffusion:
            raise ApiError("edits need a diffusion model (they denoise masked spans in place); this one is "
                           "autoregressive", 400, "model")
        if len(req.input) > self.limits.max_prompt_chars:
            raise ApiError(f"input: {len(req.input)} characters is above the limit of {self.limits.max_prompt_chars}",
                           400, "input")
        if not req.input:
            raise ApiError("input: empty; paste the text to edit", 400, "input")
        mode = req.resolved_mode()
        if mode == "instruction" and not req.instruction:
            raise ApiError("instruction: required in instruction mode", 400, "instruction")
        if mode == "spans" and not req.spans and not has_markers(req.input):
            raise ApiError("spans: give at least one [start, end) character range (or <<< >>> markers in the input) "
                           "in spans mode", 400, "spans")
        check_edit(req, mode, self.limits)
        opts = self.options(req, 0)
        self.refuse_if_stopping()
        t0 = time.perf_counter()
        ticket = await self.worker.run_job(edit_job(self.pipeline, req, mode, opts), every_step=req.stream)
        meta = {"id": f"edit-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return StreamingResponse(self.stream_edit(ticket, meta, req.diffusing, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await self.wait_final(request, ticket)
        except ClientGone:
            self.worker.cancel(ticket.request_id)
            self.metrics.requests.labels("/v1/edits", "cancelled").inc()
            return Response(status_code=499)
        from unmask.serve.edits import edit_response_fields

        text, fields, usage = edit_response_fields(self.tokenizer, done.value, t0)
        self.record("/v1/edits", t0, usage)
        return JSONResponse({**meta, "object": "edit", "choices": [{"index": 0, "text": text, **fields}],
                             "usage": usage})

    async def stream_edit(self, ticket, meta: dict, diffusing: bool, t0: float) -> AsyncIterator[str]:
        from unmask.serve.edits import edit_response_fields

        done = False
        try:
            while True:
                item = await ticket.next()
                if isinstance(item, JobDone):
                    text, fields, usage = edit_response_fields(self.tokenizer, item.value, t0)
                    yield sse({**meta, "object": "edit.chunk",
                               "choices": [{"index": 0, "text": text, "finish_reason": "stop", **fields}],
                               "usage": usage})
                    yield "data: [DONE]\n\n"
                    done = True
                    self.record("/v1/edits", t0, usage)
                    return
                if diffusing:  # intermediate edit states: the whole document, masks shown
                    text, pieces = render_canvas(self.tokenizer, item.canvas, self.config.mask_id, None,
                                                 hide=self.absorbed)
                    yield sse({**meta, "object": "edit.chunk",
                               "choices": [{"index": 0, "text": text, "finish_reason": None,
                                            "diffusion": self.diffusion_info(item, pieces)}]})
        except Exception as e:  # bad spans, edit failures: tell the client in-band
            done = True
            self.metrics.requests.labels("/v1/edits", "error").inc()
            yield sse(error_body(str(e)))
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.worker.cancel(ticket.request_id)
                self.metrics.requests.labels("/v1/edits", "cancelled").inc()


def option_field(message: str, req: DecodingFields) -> str | None:
    """The request field an options error is about: the first field its message names (the engine's
    max_new_tokens is the client's max_tokens or max_completion_tokens)."""
    fields = set(type(req).model_fields) | set(declared_params())
    for word in re.findall(r"[a-z_]+", message):
        if word == "max_new_tokens":
            return req.tokens_field()
        if word in fields:
            return word
    return None


def endpoint_label(request: Request) -> str:
    """A request's metrics label: its route's template (`/v1/models/{model_id:path}`), never the raw path,
    so clients cannot add series by inventing paths."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def says_json(content_type: str) -> bool:
    """Whether a request's Content-Type is JSON as FastAPI reads it (application/json or application/*+json):
    the only body it parses."""
    media = content_type.split(";")[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def body_problem(errors: list[dict], content_type: str) -> str | None:
    """The message for a body that is not a JSON object at all; pydantic's own ("1: JSON decode error",
    "body: Input should be a valid dictionary") do not say what is wrong. None: a field-level problem."""
    err = errors[0] if len(errors) == 1 else {}
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"body: not valid JSON{where}: {err.get('ctx', {}).get('error', 'decode error')}"
    if loc != ("body",):
        return None
    if not says_json(content_type):  # FastAPI parses JSON only when the client says so
        return f"body: send a JSON object with Content-Type: application/json (got {content_type or 'none'!r})"
    if err.get("type") == "missing":
        return "body: empty; send a JSON object"
    return None


async def parse_json_body(request: Request) -> None:
    """Parse a JSON body before FastAPI does (Starlette keeps the result, so it is parsed once), to say what is
    wrong with one that is not UTF-8 or nests deeper than the parser goes: FastAPI answers both with a bare 400.
    Syntax errors are left to FastAPI, whose 422 says where (body_problem)."""
    try:
        await request.json()
    except UnicodeDecodeError as e:
        raise ApiError(f"body: not valid UTF-8 (byte {e.start}: {e.object[e.start:e.start + 1]!r})", 422,
                       "body") from None
    except RecursionError:
        raise ApiError("body: JSON nested too deep", 422, "body") from None
    except ValueError:  # json.JSONDecodeError
        pass


# errors the app's exception handlers answer; anything else is a bug, answered here with a 500
HANDLED = (HTTPException, RequestValidationError, UnmaskError)


def internal_error(request: Request, e: Exception) -> JSONResponse:
    """A 500 for a bug: logged with its traceback, counted, and answered like any error. Answered by the
    route, not by Starlette's ServerErrorMiddleware: that one re-raises, and uvicorn then drops the
    keep-alive connection without saying so, failing the client's next request on it."""
    log.exception("unhandled error on %s", request.url.path)
    request.app.state.server.metrics.requests.labels(endpoint_label(request), "500").inc()
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)


class JsonRoute(APIRoute):
    """FastAPI's route, with the JSON body parsed by parse_json_body first, and a bug answered as a 500."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            try:
                if says_json(request.headers.get("content-type", "")):
                    await parse_json_body(request)
                return await handle(request)
            except HANDLED:
                raise
            except Exception as e:  # noqa: BLE001
                return internal_error(request, e)

        return parse_then_handle


class BodyLimit:
    """413 for a body above the limit, before the app sees it: a declared Content-Length at once, a chunked
    body (which declares none) as soon as the bytes read pass the limit; the connection is closed (the rest
    of the body is never read). The body is read here and handed on whole. (A body that arrives too slowly
    is the protocol's: serve/protocol.py.) A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide
    client disconnects from the handlers (after the body, `receive` is the server's own again)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(413, f"{int(declared)} bytes is above the limit of {self.max_bytes} bytes",
                              scope, receive, send)
            return
        body = await self.read(receive)
        if isinstance(body, int):
            await self.refuse(413, f"{body} bytes read so far is above the limit of {self.max_bytes} bytes",
                              scope, receive, send)
        elif body is not None:
            await self.app(scope, self.replay(body, receive), send)

    async def read(self, receive) -> bytes | int | None:
        """The whole body; the bytes read once they pass the limit; None if the client left while sending."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return size
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def refuse(status: int, problem: str, scope, receive, send) -> None:
        body = error_body(f"body: {problem}", param="body")
        await JSONResponse(body, status_code=status, headers={"Connection": "close"})(scope, receive, send)

    @staticmethod
    def replay(body: bytes, receive):
        """`receive` that gives the body read, then the server's messages (a disconnect)."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again():
            return pending.pop() if pending else await receive()

        return receive_again


def create_app(pipeline: Any, model_name: str | None = None, max_batch: int = 8, max_queue: int = 64,
               limits: ServerLimits | None = None, defaults: DecodeOptions | None = None, engine: Any = None,
               max_edit_queue: int = 16) -> FastAPI:
    """The FastAPI app serving `pipeline`. `engine` defaults to the model's request queue: the diffusion
    Engine, or ARQueue for a causal AR twin (decoding/queues.py)."""
    if engine is None:
        from unmask.decoding.queues import request_queue

        engine = request_queue(pipeline.model, max_batch=max_batch, max_queue=max_queue)
    name = model_name or (Path(pipeline.path).name if getattr(pipeline, "path", None) else "unmask")
    defaults = defaults or getattr(pipeline, "defaults", None) or DecodeOptions()
    srv = Server(pipeline, engine, name, limits or ServerLimits(), defaults, max_edit_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.worker.start()
        yield
        await asyncio.to_thread(srv.worker.stop)

    app = FastAPI(title="unmask", summary="OpenAI-compatible server for diffusion language models",
                  lifespan=lifespan)
    app.router.route_class = JsonRoute
    app.state.server = srv

    app.add_middleware(BodyLimit, max_bytes=srv.limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        srv.metrics.requests.labels(endpoint_label(request), str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(error_body(str(e), e.type, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(UnmaskError)
    async def unmask_error(request: Request, e: UnmaskError):
        status = 429 if isinstance(e, QueueFull) else 400
        srv.metrics.requests.labels(endpoint_label(request), str(status)).inc()
        headers = retry_headers(getattr(e, "retry_after", 1.0)) if status == 429 else None
        kind = "rate_limit_error" if status == 429 else "invalid_request_error"
        return JSONResponse(error_body(str(e), kind), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        # unknown paths and methods, missing static files: OpenAI's error body too, as OpenAI answers them
        # (not counted in /metrics: the path label would take any value a client sends)
        body = error_body(f"{e.detail}: {request.method} {request.url.path}")
        return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unhandled_error(request: Request, e: Exception):  # outside a route (middleware): the last resort
        return internal_error(request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        msgs, param = [], None
        problem = body_problem(e.errors(), request.headers.get("content-type", ""))
        if problem:
            srv.metrics.requests.labels(endpoint_label(request), "422").inc()
            return JSONResponse(error_body(problem, param="body"), status_code=422)
        for err in e.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            field = ".".join(loc) or "body"
            param = param or field
            msgs.append(f"{field}: {err.get('msg', 'invalid')}")
        srv.metrics.requests.labels(endpoint_label(request), "422").inc()
        return JSONResponse(error_body("; ".join(msgs), param=param), status_code=422)

    @app.get("/health")
    async def health():
        w = srv.worker
        ok = w.alive or w.steps == 0  # not started yet is fine: it starts on the first request
        body = {"status": "ok" if ok else "worker stopped", "model": srv.model_name,
                "queue_depth": w.num_waiting, "active": w.num_active, "engine_steps": w.steps,
                "last_error": w.last_error}
        prefix = getattr(w.engine, "prefix", None)
        if prefix is not None:  # read without the worker's lock: counters, a moment old at worst
            body["prefix_cache"] = {"blocks": len(prefix), "capacity": prefix.capacity, "reused": prefix.reused,
                                    "computed": prefix.computed}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        srv.check_model(model_id)
        return srv.model_card()

    @app.get("/v1/policies")
    async def policies():
        return srv.policies()

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await srv.completion(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await srv.chat(request, body)

    @app.post("/v1/edits")
    async def edits(request: Request, body: EditRequest):
        return await srv.edit(request, body)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
