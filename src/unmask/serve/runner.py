"""Run an app with uvicorn: `unmask serve` in the foreground, `BackgroundServer` on a thread (loopback, free
port) for `unmask bench serve` and tests. Both use the same settings: the guarded h11 protocol (header
deadline, bounded half-open connections: serve/protocol.py) and a bounded shutdown."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from unmask.errors import UnmaskError
from unmask.serve.protocol import guarded_protocol


@dataclass
class ConnectionLimits:
    """What one client connection may hold (serve/protocol.py)."""

    header_timeout: float = 10.0  # seconds for a request's headers to arrive; slower -> 408, closed
    body_timeout: float = 30.0  # seconds for its body to arrive after the headers; slower -> 408, closed
    max_half_open: int = 128  # connections with a request half-read; one more closes the oldest
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive)
    max_connections: int = 1024  # connections + requests in flight; above: 503 (uvicorn's limit_concurrency)
    shutdown_timeout: float = 3.0  # seconds decoding requests get to finish after SIGTERM


class Server(uvicorn.Server):
    """uvicorn's server, which tells the app that shutdown begins before it waits for connections to close:
    without that, uvicorn waits for every stream to end on its own (77 s measured with 16 open)."""

    def __init__(self, app: ASGIApp, host: str, port: int, log_level: str = "info", limits: ConnectionLimits | None = None):
        self.limits = lim = limits or ConnectionLimits()
        super().__init__(uvicorn.Config(
            app, host=host, port=port, log_level=log_level, lifespan="on",
            http=guarded_protocol(lim.header_timeout, lim.body_timeout, lim.max_half_open),
            timeout_keep_alive=lim.keep_alive, limit_concurrency=lim.max_connections,
            # the app ends its requests at shutdown_timeout; a second more for their last bytes
            timeout_graceful_shutdown=lim.shutdown_timeout + 1.0))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        served = getattr(getattr(self.config.app, "state", None), "server", None)  # unmask's app: its Server
        if served is not None:
            served.begin_shutdown(self.limits.shutdown_timeout)
        await super().shutdown(sockets)


def serve(app: ASGIApp, host: str, port: int, log_level: str = "info", limits: ConnectionLimits | None = None) -> None:
    """Serve in the foreground until SIGINT / SIGTERM."""
    Server(app, host, port, log_level, limits).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """`with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")` — stops the server on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
                 limits: ConnectionLimits | None = None):
        self.host, self.port = host, port or free_port(host)
        self.server = Server(app, self.host, self.port, log_level, limits)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UnmaskError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
