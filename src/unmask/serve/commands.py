"""What handlers and edit jobs tell the worker thread (its inbox), and what comes back to them.

Every command is a small dataclass the worker matches on; results travel to a `Sink`: a `Ticket` (the
asyncio end of a client request) or an edit job's own queue. Messages besides StepEvents: `JobDone` (an
edit's value) and `Failed` (the error that ended a request).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from unmask.decoding.contract import CanvasRequest, DecodeRequest
from unmask.decoding.events import StepEvent


class Cancelled(Exception):
    """Raised inside an edit job once its client has disconnected."""


@dataclass
class JobDone:
    value: object  # the edit's result (edit/editor.py's EditResult or infill's)


@dataclass
class Failed:
    error: BaseException


Message = StepEvent | JobDone | Failed


class Sink(Protocol):
    """Where a request's messages go; `put` is called on the worker thread."""

    def put(self, item: Message) -> None: ...


class EditJob(Protocol):
    """What the worker knows of an edit job (serve/jobs.py): its id, and whether its client has gone."""

    id: str
    cancelled: threading.Event


class Ticket:
    """The asyncio end of one request: iterate it for StepEvents (the last one has done=True) / JobDone."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.events: asyncio.Queue[Message] = asyncio.Queue()
        self._loop = loop

    def put(self, item: Message) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            pass

    async def next(self) -> StepEvent | JobDone:
        item = await self.events.get()
        if isinstance(item, Failed):
            raise item.error
        return item


@dataclass
class SubmitGroup:
    """One client request's choices, admitted whole or refused whole; `admitted` resolves once its first
    choice is in the decoder (or fails with the reason it was refused)."""

    tickets: list[Ticket]
    requests: list[DecodeRequest]  # request_id: the ticket's
    every_step: bool
    admitted: concurrent.futures.Future


@dataclass
class SubmitCanvases:
    """An edit job's canvases, as one group of decoder requests whose events go to `sink`."""

    job: EditJob
    requests: list[CanvasRequest]
    sink: Sink


@dataclass
class CallOnWorker:
    """An edit job's plain forward pass, run between two decoder steps; its value (or error) goes to `done`."""

    fn: Callable[[], object]
    done: concurrent.futures.Future


@dataclass
class Cancel:
    request_id: str  # a client request's ticket, an edit job, or one canvas of it


@dataclass
class RefuseWaiting:
    """Shutdown begins: requests not yet in the batch get `error` now."""

    error: BaseException


@dataclass
class Abort:
    """The shutdown timeout is over: everything in flight gets `error`."""

    error: BaseException


@dataclass
class Wake:
    """Nothing to do but look at the stop flag."""


Command = SubmitGroup | SubmitCanvases | CallOnWorker | Cancel | RefuseWaiting | Abort | Wake
