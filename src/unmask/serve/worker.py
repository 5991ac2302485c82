"""The one thread that owns the model: it drives the engine and runs edit jobs; asyncio handlers talk to it.

The model (and the engine's queues) are not thread-safe, so every call into them happens on this thread.
Handlers post commands to an inbox (submit, cancel, run a job) and get back a `Ticket`: an asyncio queue
that receives the request's `StepEvent`s through `loop.call_soon_threadsafe`. Between commands the thread
calls `engine.step()` as long as there is work, so concurrent requests share each batched denoising step.

Edit jobs (`run_job`) run whole on this thread between engine steps; their `on_step` callback streams their
states the same way and raises `Cancelled` once the client has gone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.serve.schema import ApiError

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside a job's on_step once its client has disconnected."""


@dataclass
class JobDone:
    value: Any


@dataclass
class Failed:
    error: BaseException


class Ticket:
    """The asyncio end of one request: iterate it for StepEvents (the last one has done=True) / JobDone."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop

    def put(self, item: Any) -> None:  # called from the worker thread
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            pass

    async def next(self) -> Any:
        item = await self.events.get()
        if isinstance(item, Failed):
            raise item.error
        return item


def _count(value: Any) -> int:
    return int(value() if callable(value) else value)


class Worker:
    def __init__(self, engine: Any, max_jobs: int = 16, idle_poll_s: float = 0.2):
        self.engine = engine
        self.max_jobs = max_jobs
        self.idle_poll_s = idle_poll_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets: dict[str, tuple[Ticket, bool]] = {}  # engine request id -> (ticket, wants every step)
        self._jobs: collections.deque = collections.deque()
        self._jobs_waiting = 0  # jobs submitted and not finished (guarded by _lock)
        self._cancelled: set[str] = set()  # job ids whose client left (read by running jobs)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.steps = 0  # engine steps taken (for /health)
        self.last_error: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="unmask-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return _count(self.engine.num_waiting) + self._jobs_waiting

    @property
    def num_active(self) -> int:
        return _count(self.engine.num_active)

    # --- called from the event loop ----------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], options: DecodeOptions, suffix_ids: list[int] | None = None,
                     every_step: bool = True, **request: Any) -> Ticket:
        """Queue a generation (`request`: the engine's stop_when / first_allowed); raises the engine's
        QueueFull when its queue is full."""
        self.start()
        loop = asyncio.get_running_loop()
        ticket = Ticket(f"req-{uuid.uuid4().hex[:16]}", loop)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("submit", ticket, every_step, prompt_ids, options, suffix_ids, request, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the client left while the worker was busy: drop the request
            self.cancel(ticket.request_id)
            raise
        return ticket

    async def run_job(self, job: Callable[[Callable[[StepEvent], None]], Any], every_step: bool = True) -> Ticket:
        """Run `job(on_step)` on the worker thread; its return value arrives as JobDone."""
        self.start()
        with self._lock:
            if self._jobs_waiting >= self.max_jobs:
                raise ApiError(f"server busy: {self._jobs_waiting} edits queued; retry later", 429)
            self._jobs_waiting += 1
        ticket = Ticket(f"edit-{uuid.uuid4().hex[:16]}", asyncio.get_running_loop())
        self._inbox.put(("job", ticket, every_step, job))
        return ticket

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        self._inbox.put(("cancel", request_id))

    # --- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("worker started")
        while not self._stopping.is_set():
            busy = bool(self._jobs) or self.engine.has_work()
            self._drain(block=not busy)
            if self._jobs:
                self._run_job(*self._jobs.popleft())
            if self.engine.has_work():
                self._step()
        self._fail_all(RuntimeError("server shutting down"))
        log.info("worker stopped")

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self.idle_poll_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "submit":
            _, ticket, every_step, prompt_ids, options, suffix_ids, request, accepted = cmd
            try:
                rid = self.engine.submit(prompt_ids, options, request_id=ticket.request_id, suffix_ids=suffix_ids,
                                         **request)
            except BaseException as e:  # QueueFull, bad options: the handler turns it into a 4xx
                accepted.set_exception(e)
                return
            ticket.request_id = rid
            self._tickets[rid] = (ticket, every_step)
            accepted.set_result(rid)
        elif kind == "job":
            self._jobs.append(cmd[1:])
        elif kind == "cancel":
            rid = cmd[1]
            if self._tickets.pop(rid, None) is not None:
                self.engine.cancel(rid)
            for job in list(self._jobs):  # a queued edit that never started
                if job[0].request_id == rid:
                    self._jobs.remove(job)
                    self._job_finished(rid)
            self._cancelled.discard(rid)  # a running job has seen it already (it ran on this thread)

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            # the engine's state is unknown now: fail everything in flight, keep serving new requests
            log.exception("engine step failed")
            self.last_error = f"{type(e).__name__}: {e}"
            self._fail_all(e)
            return
        self.steps += 1
        for ev in events:
            entry = self._tickets.get(ev.request_id)
            if entry is None:  # cancelled meanwhile
                continue
            ticket, every_step = entry
            if ev.done:
                del self._tickets[ev.request_id]
            if ev.done or every_step:
                ticket.put(ev)

    def _fail_all(self, error: BaseException) -> None:
        for rid, (ticket, _) in list(self._tickets.items()):
            try:
                self.engine.cancel(rid)
            except Exception:  # the engine may be broken; the client still gets its error
                log.exception("cancel after failure")
            ticket.put(Failed(error))
        self._tickets.clear()
        while self._jobs:
            ticket = self._jobs.popleft()[0]
            self._job_finished(ticket.request_id)
            ticket.put(Failed(error))

    def _run_job(self, ticket: Ticket, every_step: bool, job: Callable) -> None:
        rid = ticket.request_id

        def on_step(ev: StepEvent) -> None:
            if rid in self._cancelled:
                raise Cancelled(rid)
            if every_step:
                ticket.put(ev)

        t0 = time.perf_counter()
        try:
            value = job(on_step)
        except Cancelled:
            log.info("edit %s cancelled after %.2fs", rid, time.perf_counter() - t0)
        except Exception as e:  # user errors (bad spans) and bugs alike go back to the client
            ticket.put(Failed(e))
        else:
            ticket.put(JobDone(value))
        finally:
            self._job_finished(rid)

    def _job_finished(self, rid: str) -> None:
        self._cancelled.discard(rid)
        with self._lock:
            self._jobs_waiting -= 1
