"""What completions and chat share (vLLM's serving engine): a request's choices, each a prompt prepared by the
front end, submitted to the worker as one group, and answered as one JSON body or as Server-Sent Events.

Streaming (`stream: true`) is OpenAI's chunk format, ending with `data: [DONE]`. Deltas carry the committed
prefix of the text as it grows. With `diffusing: true` every chunk instead carries the WHOLE current text,
each still-masked position shown as MASK_PLACEHOLDER ("░"), plus a `diffusion` object per choice (step,
masked count, per-position pieces) — each chunk replaces the last. `usage` adds our figures to OpenAI's
token counts: nfe, steps, tokens_per_step, seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unmask.decoding.detokenize import DeltaStream, committed_prefix, tokens_for_text
from unmask.decoding.events import StepEvent
from unmask.decoding.frontend import Prepared, finish
from unmask.decoding.options import DecodeOptions
from unmask.decoding.result import GenerationResult
from unmask.serve.commands import Ticket
from unmask.serve.http import STREAM_HEADERS, error_body, sse
from unmask.serve.logprobs import LogprobFormat
from unmask.serve.schema import DecodingFields
from unmask.serve.server import ClientGone, Server
from unmask.serve.text import render_canvas

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """One answer of a response: prompt i's sample j is choice i * n + j (OpenAI's order)."""
    index: int
    prepared: Prepared
    counts_prompt: bool  # a prompt's first choice: its tokens count in usage once
    echo: str = ""  # the prompt's text, put before the answer (completions' `echo`)

    @property
    def opts(self) -> DecodeOptions:
        return self.prepared.options

    @property
    def skip(self) -> str:
        return self.prepared.skip


@dataclass
class Final:
    choice: Choice
    result: GenerationResult  # finished by the front end: text, the tokens that make it, completion_tokens


def choices_for(req: DecodingFields, first_index: int, prepared: Prepared, echo: str = "") -> list[Choice]:
    """The request's `n` choices for one prompt. A seed gives each choice its own (seed + j)."""
    def seeded(j: int) -> Prepared:  # wrapped into torch's signed 64-bit seeds
        o = prepared.options
        return prepared if o.seed is None else prepared.with_options(o.replace(seed=(o.seed + j + 2**63) % 2**64 - 2**63))

    return [Choice(first_index + j, seeded(j), j == 0, echo) for j in range(req.n)]


def result_logprobs(result: GenerationResult) -> list:
    """A GenerationResult's (logprob, top alternatives) per token."""
    return list(zip(result.logprobs or [], result.top_logprobs or []))


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's finish reason of a finished answer: EOS and stop strings are "stop"."""
    return "stop" if result.finish_reason in ("eos", "stop") else "length"


def logprob_format(srv: Server, c: Choice, chat: bool) -> LogprobFormat | None:
    if c.opts.logprobs is None:
        return None
    return LogprobFormat(srv.tokenizer, chat, skip=c.skip, offset=len(c.echo))


def usage(finals: list[Final], t0: float) -> dict:
    """OpenAI's token counts (each prompt once) plus ours, summed over the choices; seconds: the one
    choice's decoding time, or the request's wall time for several."""
    n_prompt = sum(f.result.prompt_tokens for f in finals if f.choice.counts_prompt)
    n_completion = sum(f.result.completion_tokens for f in finals)
    steps = sum(f.result.steps for f in finals)
    nfe = sum(f.result.nfe for f in finals)
    one = float(finals[0].result.seconds) if len(finals) == 1 else 0.0
    seconds = one or (time.perf_counter() - t0)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "nfe": nfe, "steps": steps,
            "tokens_per_step": round(n_completion / max(steps, 1), 4), "seconds": round(seconds, 6)}


def diffusion_info(ev: StepEvent, pieces: list[str | None], final: bool = False) -> dict:
    masked = sum(p is None for p in pieces)
    info = {"step": ev.step, "masked": masked, "total": len(pieces), "pieces": pieces,
            "changed": [i for i in ev.changed if i < len(pieces)], "final": final}
    if ev.logprobs is not None:  # with logprobs: each committed token's probability when it was committed
        info["confidence"] = [None if e is None else round(math.exp(e[0]), 4) for e in ev.logprobs[: len(pieces)]]
    return info


async def respond(srv: Server, request: Request, req: DecodingFields, endpoint: str, choices: list[Choice],
                  chat: bool) -> Response:
    """Submit the choices as one group (admitted whole or refused whole: serve/scheduler.py), then answer."""
    srv.refuse_if_stopping()
    t0 = time.perf_counter()
    tickets, admitted = srv.worker.submit_group([c.prepared.request for c in choices], every_step=req.stream)
    try:
        await srv.admission(request, admitted)
    except ClientGone:
        srv.cancel(tickets)
        srv.metrics.requests.labels(endpoint, "cancelled").inc()
        return Response(status_code=499)
    except BaseException:  # refused (queue full, bad options): none of its choices stays
        srv.cancel(tickets)
        raise
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": srv.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = ChoiceStreams(srv, choices, tickets, meta, chat, req.diffusing)
        return StreamingResponse(stream.body(include_usage, endpoint, t0), media_type="text/event-stream",
                                 headers=STREAM_HEADERS)
    return await answer(srv, request, choices, tickets, meta, chat, endpoint, t0)


async def answer(srv: Server, request: Request, choices: list[Choice], tickets: list[Ticket], meta: dict, chat: bool,
                 endpoint: str, t0: float) -> Response:
    """The whole response once every choice is done."""
    events = await asyncio.gather(*(srv.wait_final(request, t) for t in tickets), return_exceptions=True)
    failed = [e for e in events if isinstance(e, BaseException)]
    if failed:
        srv.cancel(tickets)
        if all(isinstance(e, ClientGone) for e in failed):
            srv.metrics.requests.labels(endpoint, "cancelled").inc()
            return Response(status_code=499)
        raise next(e for e in failed if not isinstance(e, ClientGone))
    answers, finals = [], []
    for c, ev in zip(choices, events):
        result = finish(srv.tokenizer, srv.config, ev.result, c.prepared)
        finals.append(Final(c, result))
        logprobs = logprob_format(srv, c, chat)
        if logprobs is not None:
            logprobs = logprobs(result.tokens, result_logprobs(result)[: len(result.tokens)])
        if chat:
            answers.append({"index": c.index, "message": {"role": "assistant", "content": result.text},
                            "logprobs": logprobs, "finish_reason": finish_reason(result)})
        else:
            answers.append({"index": c.index, "text": c.echo + result.text, "logprobs": logprobs,
                            "finish_reason": finish_reason(result)})
    total = usage(finals, t0)
    srv.record(endpoint, t0, total)
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**meta, "object": obj, "choices": answers, "usage": total})


class ChoiceStreams:
    """Every choice's chunks as they come (each carries its choice index), then usage and [DONE]."""

    def __init__(self, srv: Server, choices: list[Choice], tickets: list[Ticket], meta: dict, chat: bool,
                 diffusing: bool):
        self.srv, self.choices, self.tickets, self.meta = srv, choices, tickets, meta
        self.chat, self.diffusing = chat, diffusing
        self.obj = "chat.completion.chunk" if chat else "text_completion"

    async def body(self, include_usage: bool, endpoint: str, t0: float) -> AsyncIterator[str]:
        srv, merged, ended = self.srv, asyncio.Queue(), object()

        async def pump(c: Choice, ticket: Ticket) -> None:
            try:
                async for item in self.choice(c, ticket):
                    await merged.put(item)
            except Exception as e:  # noqa: BLE001 (handed to the response, which reports it in-band)
                await merged.put(e)
            await merged.put(ended)

        tasks = [asyncio.create_task(pump(c, t)) for c, t in zip(self.choices, self.tickets)]
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
            total = usage(finals, t0)
            if include_usage:
                yield sse({**self.meta, "object": self.obj, "choices": [], "usage": total})
            yield "data: [DONE]\n\n"
            done = True
            srv.record(endpoint, t0, total)
        except Exception as e:  # the engine refused or failed mid-way: tell the client in-band
            done = True
            srv.cancel(self.tickets)
            srv.metrics.requests.labels(endpoint, "error").inc()
            yield sse(error_body(str(e), "server_error"))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()
            if not done:  # client went away (the response task was cancelled) or an unexpected error
                srv.cancel(self.tickets)
                srv.metrics.requests.labels(endpoint, "cancelled").inc()
                log.info("request %s cancelled: client disconnected", ", ".join(t.request_id for t in self.tickets))

    def chunk(self, c: Choice, text: str | None, finish: str | None = None, extra: dict | None = None,
              role: bool = False) -> str:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", **delta}
            choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": c.index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if extra:
            choice.update(extra)
        return sse({**self.meta, "object": self.obj, "choices": [choice]})

    async def choice(self, c: Choice, ticket: Ticket) -> AsyncIterator[str | Final]:
        """One choice's SSE chunks, then its Final."""
        srv = self.srv
        deltas = c.prepared.deltas(srv.tokenizer, srv.config)
        logprobs = logprob_format(srv, c, self.chat)
        sent = 0  # tokens whose logprobs went out: those the streamed text covers
        if self.chat:
            yield self.chunk(c, "", role=True)
        if c.echo and not self.diffusing:  # deltas: the prompt comes first; diffusing chunks each carry it
            yield self.chunk(c, c.echo)
        while not (ev := await ticket.next()).done:
            if self.diffusing:
                text, pieces = render_canvas(srv.tokenizer, ev.canvas, srv.config.mask_id, srv.config.eos_id,
                                             skip=c.skip)
                yield self.chunk(c, c.echo + text, extra={"diffusion": diffusion_info(ev, pieces)})
            elif delta := deltas.update(ev.canvas):
                extra = None
                if logprobs is not None:
                    prefix = committed_prefix(ev.canvas, srv.config.mask_id, srv.config.eos_id)
                    covered = tokens_for_text(srv.tokenizer, prefix, c.skip + deltas.sent)
                    extra = {"logprobs": logprobs(prefix[sent:covered], ev.logprobs[sent:covered])}
                    sent = covered
                yield self.chunk(c, delta, extra=extra)
        result = finish(srv.tokenizer, srv.config, ev.result, c.prepared)
        for chunk in self.last_chunks(c, ev, result, deltas, logprobs, sent):
            yield chunk
        yield Final(c, result)

    def last_chunks(self, c: Choice, ev: StepEvent, result: GenerationResult, deltas: DeltaStream,
                    logprobs: LogprobFormat | None, sent: int) -> list[str]:
        """The chunks that end a choice: the rest of its text (or its final state) and its finish reason."""
        rest = None
        if logprobs is not None:  # diffusing: each chunk replaces the last, so the final one has them all
            rest = {"logprobs": logprobs(result.tokens[sent:], result_logprobs(result)[sent: len(result.tokens)])}
        reason = finish_reason(result)
        if self.diffusing:
            srv = self.srv
            _, pieces = render_canvas(srv.tokenizer, result.tokens, srv.config.mask_id, srv.config.eos_id, skip=c.skip)
            return [self.chunk(c, c.echo + result.text, reason,
                               extra={"diffusion": diffusion_info(ev, pieces, final=True), **(rest or {})})]
        delta = deltas.finish(result.text)
        chunks = [self.chunk(c, delta, extra=rest)] if delta or rest else []
        return chunks + [self.chunk(c, None if self.chat else "", reason)]
