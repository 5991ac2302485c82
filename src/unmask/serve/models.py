"""The routes that read the server rather than decode: `/v1/models`, `/v1/policies`, `/health`, `/metrics`
and the demo page at `/`."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, Response

from unmask.decoding.policies import POLICIES, declared_params
from unmask.serve.http import JsonRoute
from unmask.serve.server import Server, server
from unmask.serve.text import MASK_PLACEHOLDER

STATIC = Path(__file__).parent / "static"

router = APIRouter(route_class=JsonRoute)


def model_card(srv: Server) -> dict:
    """The served model as /v1/models lists it: OpenAI's fields, then ours."""
    c, d = srv.config, srv.defaults
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "unmask",
            "max_model_len": c.max_seq_len, "attention": srv.layout.name, "mask_placeholder": MASK_PLACEHOLDER,
            "max_tokens_limit": min(srv.limits.max_tokens, c.max_seq_len),
            "defaults": {"max_tokens": d.max_new_tokens, "block_length": d.block_length, "policy": d.policy,
                         **{name: d.param(name) for name in declared_params()}}}


@router.get("/v1/models")
async def models(srv: Server = Depends(server)) -> dict:
    return {"object": "list", "data": [model_card(srv)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, srv: Server = Depends(server)) -> dict:
    srv.check_model(model_id)
    return model_card(srv)


@router.get("/v1/policies")
async def policies(srv: Server = Depends(server)) -> dict:
    """The registered policies with their knobs (name, type, range, help); each knob's `default` is this
    server's (the model's generation_config.json over the declared default)."""
    data = [cls.describe() for cls in POLICIES.values()]
    for policy in data:
        for knob in policy["params"]:
            knob["default"] = srv.defaults.param(knob["name"])
    return {"object": "list", "data": data, "default": srv.defaults.policy}


@router.get("/health")
async def health(srv: Server = Depends(server)) -> JSONResponse:
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


@router.get("/metrics")
async def metrics(srv: Server = Depends(server)) -> Response:
    return Response(srv.metrics.render(), media_type=srv.metrics.content_type)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html")
