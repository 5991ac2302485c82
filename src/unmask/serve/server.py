"""The state behind one app — pipeline, worker, limits, defaults, metrics — and what every route asks of it:
the model a request names, its decoding options, its prompt prepared by the front end (decoding/frontend.py),
waiting for admission or a final event while watching for the client to leave, and shutdown."""

from __future__ import annotations

import asyncio
import re
import time

from fastapi import Request

from unmask.chat import end_of_turn_strings
from unmask.decoding.contract import ContextError, Decoder
from unmask.decoding.events import StepEvent
from unmask.decoding.frontend import Prepared, prepare
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions
from unmask.decoding.policies import declared_params
from unmask.errors import UnmaskError
from unmask.pipeline import Pipeline
from unmask.serve.commands import Abort, JobDone, RefuseWaiting, Ticket
from unmask.serve.metrics import Metrics
from unmask.serve.schema import ApiError, DecodingFields, ServerLimits, check_limits
from unmask.serve.worker import Worker
from unmask.tokenizer import USER


class ClientGone(Exception):
    pass


def shutting_down(why: str) -> ApiError:
    return ApiError(f"server shutting down: {why}; retry on another replica or after restart", 503,
                    type="server_error")


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


def server(request: Request) -> Server:
    """The app's Server: every route's dependency."""
    return request.app.state.server


class Server:
    """State behind one app: pipeline, worker, limits, metrics; the routes (serve/completions.py, chat.py,
    edits.py, models.py) get it as a dependency (`server`)."""

    def __init__(self, pipeline: Pipeline, engine: Decoder, model_name: str, limits: ServerLimits,
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

    def check_choices(self, req: DecodingFields, n_prompts: int) -> None:
        if n_prompts * req.n > self.limits.max_choices:
            raise ApiError(f"n: {n_prompts} prompt(s) x n={req.n} is more than this server's "
                           f"{self.limits.max_choices} choices per request", 400, "n")

    def decode_options(self, req: DecodingFields) -> DecodeOptions:
        """The request's decoding options over this server's defaults; errors name the field sent."""
        check_limits(req, self.limits, self.config.max_seq_len, self.config.vocab_size)
        try:
            return req.decode_options(self.defaults)
        except UnmaskError as e:
            raise ApiError(str(e), 400, option_field(str(e), req)) from None

    def prepare(self, req: DecodingFields, options: DecodeOptions, prompt_ids: list[int], text: bool,
                suffix_ids: list[int] | None = None, prompt_field: str = "prompt") -> Prepared:
        """A prompt through the front end; a context error names the field to shorten (`prompt_field`:
        where the context came from)."""
        try:
            return prepare(self.tokenizer, self.config, prompt_ids, options, suffix_ids,
                           fit_length=req.max_tokens is None, text=text)
        except ContextError as e:
            field = prompt_field if e.param == "prompt" else req.tokens_field()
            raise ApiError(f"{field}: {e}", 400, field) from None

    # --- waiting on the worker ---------------------------------------------------------------------
    def cancel(self, tickets: list[Ticket]) -> None:
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

    async def wait_final(self, request: Request, ticket: Ticket) -> StepEvent | JobDone:
        """The request's last event; raises ClientGone if the client disconnects first."""
        while True:
            try:
                item = await asyncio.wait_for(ticket.next(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone from None
                continue
            if isinstance(item, JobDone) or item.done:
                return item

    def record(self, endpoint: str, t0: float, usage: dict) -> None:
        self.metrics.finished(endpoint, time.perf_counter() - t0, usage["prompt_tokens"], usage["completion_tokens"],
                              usage["nfe"], usage["steps"])
