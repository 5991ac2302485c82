"""`POST /v1/edits`: Instant Edit requests turned into jobs for the worker thread, and results into JSON.

The body follows OpenAI's retired edits endpoint (`input`, `instruction` -> `choices[0].text`) and adds
our modes: `spans` (rewrite [start, end) character ranges, or <<< >>> markers in the text), `auto`
(re-mask improbable tokens and denoise, in rounds) and `instruction` (SDEdit-style re-noising).
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.edit.editor import EditResult, edit_text, resolve_regions
from unmask.edit.options import EditOptions
from unmask.edit.spans import EditError, has_markers
from unmask.pipeline import Pipeline
from unmask.serve.commands import JobDone, Ticket
from unmask.serve.generation import diffusion_info
from unmask.serve.http import STREAM_HEADERS, JsonRoute, error_body, sse
from unmask.serve.jobs import EditFn, Job, WorkerModel
from unmask.serve.schema import ApiError, EditRequest, ServerLimits
from unmask.serve.server import ClientGone, Server, server
from unmask.serve.text import render_canvas
from unmask.tokenizer import Tokenizer

router = APIRouter(route_class=JsonRoute)


def check_edit(req: EditRequest, mode: str, limits: ServerLimits) -> None:
    """Fail fast (a 400 naming the field, as every error names its field) instead of after the job was
    queued: `n` other than 1 (an edit has one result), bad spans, or more spans than the server's limit
    (the spans' masks are decoded block after block, so their number bounds the edit's time)."""
    if req.n != 1:
        raise ApiError(f"n: an edit returns one choice; n must be 1, got {req.n}", 400, "n")
    try:
        _, regions = resolve_regions(req.input, req.spans, None, markers=True, required=mode == "spans")
    except EditError as e:
        raise ApiError(f"spans: {e}", 400, "spans") from None
    if len(regions) > limits.max_spans:
        raise ApiError(f"spans: {len(regions)} spans is more than this server's limit of {limits.max_spans} per edit",
                       400, "spans")


class WorkerPipeline:
    """The pipeline as an edit job sees it: `model` is the job's (serve/jobs.py WorkerModel), so a forward
    pass the edit makes itself (a left-to-right model's suffix scoring) runs on the worker thread too, never
    beside an engine step: the model is not thread-safe (its adapter's gate is per-call module state)."""

    def __init__(self, pipeline: Pipeline, model: WorkerModel):
        self._pipeline, self.model = pipeline, model

    def __getattr__(self, name: str) -> object:
        return getattr(self._pipeline, name)


def edit_job(pipeline: Pipeline, req: EditRequest, mode: str, options: DecodeOptions) -> EditFn:
    given = {name: getattr(req, name) for name in ("strength", "flag_below", "max_rounds", "length")}
    edit = EditOptions(mode=mode, instruction=req.instruction, **{k: v for k, v in given.items() if v is not None})

    def job(on_step: Callable[[StepEvent], None], denoiser: Job) -> EditResult:
        # the edit's own final event (done=True, no canvas) is replaced by the job's return value; its
        # canvases are requests of the server's engine (the job is its denoiser, serve/jobs.py)
        return edit_text(WorkerPipeline(pipeline, denoiser.model), req.input, req.spans, edit=edit, options=options,
                         on_step=lambda ev: None if ev.done else on_step(ev), denoiser=denoiser)

    return job


def edit_response_fields(tokenizer: Tokenizer, result: EditResult, t0: float) -> tuple[str, dict, dict]:
    """(edited text, extra choice fields, usage) for a finished edit."""
    fields = {"mode": result.mode, "spans": [list(s) for s in result.spans], "replacements": result.replacements,
              "changed": result.changed, "rounds": result.rounds}
    n_prompt = len(tokenizer.encode(result.original))
    n_new = sum(len(tokenizer.encode(r)) for r in result.replacements)
    seconds = result.seconds or (time.perf_counter() - t0)
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new,
             "nfe": result.nfe, "steps": result.steps, "tokens_per_step": round(n_new / max(result.steps, 1), 4),
             "seconds": round(seconds, 6)}
    return result.text, fields, usage


def check_request(srv: Server, req: EditRequest) -> str:
    """The edit's mode, once the request is known to be one this server can run; else a 400 naming the field."""
    srv.check_model(req.model)
    if not srv.layout.diffusion:
        raise ApiError("edits need a diffusion model (they denoise masked spans in place); this one is "
                       "autoregressive", 400, "model")
    if len(req.input) > srv.limits.max_prompt_chars:
        raise ApiError(f"input: {len(req.input)} characters is above the limit of {srv.limits.max_prompt_chars}",
                       400, "input")
    if not req.input:
        raise ApiError("input: empty; paste the text to edit", 400, "input")
    mode = req.resolved_mode()
    if mode == "instruction" and not req.instruction:
        raise ApiError("instruction: required in instruction mode", 400, "instruction")
    if mode == "spans" and not req.spans and not has_markers(req.input):
        raise ApiError("spans: give at least one [start, end) character range (or <<< >>> markers in the input) "
                       "in spans mode", 400, "spans")
    check_edit(req, mode, srv.limits)
    return mode


def edit_options(srv: Server, req: EditRequest) -> DecodeOptions:
    """The edit's decoding options; a default length is cut to the model context (as a completion's is)."""
    options = srv.decode_options(req)
    if req.max_tokens is None and options.max_new_tokens > srv.config.max_seq_len:
        options = options.replace(max_new_tokens=srv.config.max_seq_len)
    return options


@router.post("/v1/edits")
async def edits(request: Request, req: EditRequest, srv: Server = Depends(server)) -> Response:
    mode = check_request(srv, req)
    options = edit_options(srv, req)
    srv.refuse_if_stopping()
    t0 = time.perf_counter()
    ticket = await srv.worker.run_job(edit_job(srv.pipeline, req, mode, options), every_step=req.stream)
    meta = {"id": f"edit-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": srv.model_name}
    if req.stream:
        return StreamingResponse(stream_edit(srv, ticket, meta, req.diffusing, t0), media_type="text/event-stream",
                                 headers=STREAM_HEADERS)
    try:
        done = await srv.wait_final(request, ticket)
    except ClientGone:
        srv.worker.cancel(ticket.request_id)
        srv.metrics.requests.labels("/v1/edits", "cancelled").inc()
        return Response(status_code=499)
    text, fields, usage = edit_response_fields(srv.tokenizer, done.value, t0)
    srv.record("/v1/edits", t0, usage)
    return JSONResponse({**meta, "object": "edit", "choices": [{"index": 0, "text": text, **fields}], "usage": usage})


async def stream_edit(srv: Server, ticket: Ticket, meta: dict, diffusing: bool, t0: float) -> AsyncIterator[str]:
    done = False
    try:
        while not isinstance(item := await ticket.next(), JobDone):
            if diffusing:  # intermediate edit states: the whole document, masks shown
                text, pieces = render_canvas(srv.tokenizer, item.canvas, srv.config.mask_id, None, hide=srv.absorbed)
                yield sse({**meta, "object": "edit.chunk",
                           "choices": [{"index": 0, "text": text, "finish_reason": None,
                                        "diffusion": diffusion_info(item, pieces)}]})
        text, fields, usage = edit_response_fields(srv.tokenizer, item.value, t0)
        yield sse({**meta, "object": "edit.chunk",
                   "choices": [{"index": 0, "text": text, "finish_reason": "stop", **fields}], "usage": usage})
        yield "data: [DONE]\n\n"
        done = True
        srv.record("/v1/edits", t0, usage)
    except Exception as e:  # bad spans, edit failures: tell the client in-band
        done = True
        srv.metrics.requests.labels("/v1/edits", "error").inc()
        yield sse(error_body(str(e)))
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            srv.worker.cancel(ticket.request_id)
            srv.metrics.requests.labels("/v1/edits", "cancelled").inc()
