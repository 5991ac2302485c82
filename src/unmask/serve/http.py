"""HTTP plumbing shared by every route: OpenAI's error body, the JSON route (a body that is not JSON is
named as such, a bug is a 500 that keeps the connection), the body-size limit, the error handlers."""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from unmask.decoding.contract import QueueFull
from unmask.errors import UnmaskError
from unmask.serve.scheduler import retry_headers
from unmask.serve.schema import ApiError

log = logging.getLogger(__name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def count(request: Request, status: str) -> None:
    """One more answer of `status` on the request's route in /metrics."""
    request.app.state.server.metrics.requests.labels(endpoint_label(request), status).inc()


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
    count(request, "500")
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

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

    async def read(self, receive: Receive) -> bytes | int | None:
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
    async def refuse(status: int, problem: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(f"body: {problem}", param="body")
        await JSONResponse(body, status_code=status, headers={"Connection": "close"})(scope, receive, send)

    @staticmethod
    def replay(body: bytes, receive: Receive) -> Receive:
        """`receive` that gives the body read, then the server's messages (a disconnect)."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again():
            return pending.pop() if pending else await receive()

        return receive_again


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    count(request, str(e.status))
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(error_body(str(e), e.type, e.param), status_code=e.status, headers=headers)


async def unmask_error(request: Request, e: UnmaskError) -> JSONResponse:
    status = 429 if isinstance(e, QueueFull) else 400
    count(request, str(status))
    headers = retry_headers(getattr(e, "retry_after", 1.0)) if status == 429 else None
    kind = "rate_limit_error" if status == 429 else "invalid_request_error"
    return JSONResponse(error_body(str(e), kind), status_code=status, headers=headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    # unknown paths and methods, missing static files: OpenAI's error body too, as OpenAI answers them
    # (not counted in /metrics: the path label would take any value a client sends)
    body = error_body(f"{e.detail}: {request.method} {request.url.path}")
    return JSONResponse(body, status_code=e.status_code, headers=getattr(e, "headers", None))


async def unhandled_error(request: Request, e: Exception) -> JSONResponse:  # outside a route: the last resort
    return internal_error(request, e)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    count(request, "422")
    problem = body_problem(e.errors(), request.headers.get("content-type", ""))
    if problem:
        return JSONResponse(error_body(problem, param="body"), status_code=422)
    msgs, param = [], None
    for err in e.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        param = param or field
        msgs.append(f"{field}: {err.get('msg', 'invalid')}")
    return JSONResponse(error_body("; ".join(msgs), param=param), status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in ((ApiError, api_error), (UnmaskError, unmask_error), (HTTPException, http_error),
                          (Exception, unhandled_error), (RequestValidationError, validation_error)):
        app.add_exception_handler(kind, handler)
