"""The OpenAI-compatible HTTP server: a thin translation of requests into engine calls (vLLM's split).

`create_app(pipeline)` returns a FastAPI app with one router per route family:
  serve/completions.py  POST /v1/completions (with `suffix` = infilling)
  serve/chat.py         POST /v1/chat/completions
  serve/edits.py        POST /v1/edits (Instant Edit)
  serve/models.py       GET /v1/models, /v1/models/{id}, /v1/policies, /health, /metrics, the demo page at `/`
Completions and chat share serve/generation.py (choices, JSON and streamed answers); every prompt goes
through the front end (decoding/frontend.py); the state behind the routes is serve/server.py's Server.

All model work runs on one worker thread (serve/worker.py); a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from unmask.decoding.contract import Decoder
from unmask.decoding.options import DecodeOptions
from unmask.pipeline import Pipeline
from unmask.serve import chat, completions, edits, models
from unmask.serve.http import BodyLimit, JsonRoute, install_error_handlers
from unmask.serve.schema import ServerLimits
from unmask.serve.server import Server



def create_app(pipeline: Pipeline, model_name: str | None = None, max_batch: int = 8, max_queue: int = 64,
               limits: ServerLimits | None = None, defaults: DecodeOptions | None = None,
               engine: Decoder | None = None, max_edit_queue: int = 16) -> FastAPI:
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
    install_error_handlers(app)
    for family in (models, completions, chat, edits):
        app.include_router(family.router)
    app.mount("/static", StaticFiles(directory=models.STATIC), name="static")
    return app
