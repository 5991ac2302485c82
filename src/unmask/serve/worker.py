"""The one thread that owns the model: it drives the engine; asyncio handlers and edit jobs talk to it.

The model (and the engine's queues) are not thread-safe, so every call into them happens on this thread.
Handlers post commands to an inbox and get back `Ticket`s: asyncio queues that receive their request's
`StepEvent`s through `loop.call_soon_threadsafe`. Each loop of the thread handles the commands that came
in, feeds the scheduler's line into free batch rows (serve/scheduler.py), runs at most one forward pass an
edit job asked for, and takes one `engine.step()`. So every request in flight advances by one step per
loop: completions, their `n` choices and the canvases of edits (serve/jobs.py) alike.

Commands: a group of choices (admitted whole, or refused whole with a 429), an edit job's canvases, an edit
job's forward pass, a cancel; and at shutdown, refusing what waits and then aborting everything.
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
from dataclasses import replace

import torch

from unmask.decoding.contract import DecodeRequest, Decoder
from unmask.serve import memory
from unmask.serve.commands import (Abort, CallOnWorker, Cancel, Cancelled, Command, Failed, JobDone, RefuseWaiting,
                                   Sink, SubmitCanvases, SubmitGroup, Ticket, Wake)
from unmask.serve.jobs import EditFn, Job
from unmask.serve.scheduler import Entry, Group, Scheduler
from unmask.serve.schema import ApiError

__all__ = ["Cancelled", "Failed", "JobDone", "Ticket", "Worker"]

log = logging.getLogger(__name__)


class Worker:
    """`max_waiting`: requests that may wait for the engine before a 429 (default: the engine's max_queue);
    `max_jobs`: edit jobs at once."""

    TRIM_EVERY_S = 10.0  # at most this often: give freed memory back when the work runs out

    def __init__(self, engine: Decoder, max_jobs: int = 16, idle_poll_s: float = 0.2, max_waiting: int | None = None):
        self.engine = engine
        self.max_jobs = max_jobs
        self.idle_poll_s = idle_poll_s
        self.scheduler = Scheduler(engine, engine.max_queue if max_waiting is None else max_waiting)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[Sink, bool]] = {}  # engine request id -> (where its events go, every step)
        self._owner: dict[str, Job] = {}  # engine request id -> the edit job it denoises for
        self._calls: collections.deque[CallOnWorker] = collections.deque()  # edit jobs' forward passes, in order
        self._jobs: dict[str, Job] = {}  # running edit jobs (guarded by _lock)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.steps = 0  # engine steps taken (for /health)
        self.last_error: str | None = None
        self._trimmed_at = 0.0

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name="unmask-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def model(self) -> torch.nn.Module:
        """The decoder's model (edit jobs' own forward passes run it on this thread)."""
        return self.engine.model

    @property
    def num_waiting(self) -> int:
        return self.engine.capacity.waiting + self.scheduler.queued

    @property
    def num_active(self) -> int:
        return self.engine.capacity.active

    def post(self, command: Command) -> None:
        self._inbox.put(command)

    # --- called from the event loop ----------------------------------------------------------------
    def submit_group(self, requests: list[DecodeRequest], every_step: bool = True) -> tuple[list[Ticket], asyncio.Future]:
        """Queue one client request's choices as one group. Returns their tickets and a future that is done
        once the group is in the engine, or fails with the reason it was refused (LineFull / QueueFull, bad
        options); cancel the tickets if you stop waiting for it."""
        self.start()
        loop = asyncio.get_running_loop()
        tickets = [Ticket(f"req-{uuid.uuid4().hex[:16]}", loop) for _ in requests]
        requests = [replace(r, request_id=t.request_id) for r, t in zip(requests, tickets)]
        admitted: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(SubmitGroup(tickets, requests, every_step, admitted))
        return tickets, asyncio.wrap_future(admitted)

    async def submit(self, request: DecodeRequest, every_step: bool = True) -> Ticket:
        """One generation, admitted before this returns."""
        [ticket], admitted = self.submit_group([request], every_step)
        try:
            await admitted
        except BaseException:  # refused, or the client left while it waited: drop it
            self.cancel(ticket.request_id)
            raise
        return ticket

    async def run_job(self, fn: EditFn, every_step: bool = True) -> Ticket:
        """Run the edit `fn(on_step, denoiser)` on a thread of its own (serve/jobs.py); its return value
        arrives as JobDone."""
        self.start()
        ticket = Ticket(f"edit-{uuid.uuid4().hex[:16]}", asyncio.get_running_loop())
        with self._lock:
            if len(self._jobs) >= self.max_jobs:
                raise ApiError(f"server busy: {len(self._jobs)} edits running; retry later", 429)
            job = self._jobs[ticket.request_id] = Job(self, ticket, every_step, fn)
        job.start()
        return ticket

    def cancel(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            job.cancel()  # it raises Cancelled at its next event or wait and drops its engine requests
        self._inbox.put(Cancel(request_id))

    def job_finished(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    # --- the worker thread ------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("worker started")
        was_busy = False
        while not self._stopping.is_set():
            busy = bool(self._calls) or self.scheduler.has_work() or self.engine.has_work()
            if was_busy and not busy:
                self._went_idle()
            was_busy = busy
            self._drain(block=not busy)
            self._feed()
            if self._calls:  # one edit job's forward pass, then a step for everyone
                call = self._calls.popleft()
                if call.done.set_running_or_notify_cancel():
                    try:
                        call.done.set_result(call.fn())
                    except BaseException as e:  # noqa: BLE001 (raised again on the job's thread)
                        call.done.set_exception(e)
            if self.engine.has_work():
                self._step()
        self._fail_all(RuntimeError("server shutting down"))
        log.info("worker stopped")

    def _went_idle(self) -> None:
        now = time.monotonic()
        if now - self._trimmed_at >= self.TRIM_EVERY_S:
            self._trimmed_at = now
            memory.trim()

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

    def _handle(self, cmd: Command) -> None:
        match cmd:
            case SubmitGroup(tickets, requests, every_step, admitted):
                self._offer(tickets, every_step, [Entry(r) for r in requests], admitted, limited=True)
                self._feed()  # into free batch rows at once: the next request's room in the line is counted after
            case SubmitCanvases(job, requests, sink):
                if job.cancelled.is_set():
                    return
                for r in requests:
                    self._owner[r.request_id] = job
                self._offer([sink] * len(requests), True, [Entry(r) for r in requests], None, limited=False)
            case CallOnWorker():
                self._calls.append(cmd)
            case RefuseWaiting(error):
                self._refuse_waiting(error)
            case Abort(error):
                self._fail_all(error)
            case Cancel(rid):
                for own, job in list(self._owner.items()):  # an edit job's: every canvas of it
                    if own == rid or job.id == rid:
                        self._drop(own)
                self._drop(rid)
            case Wake():
                pass

    def _offer(self, sinks: list[Sink], every_step: bool, entries: list[Entry],
               admitted: concurrent.futures.Future | None, limited: bool) -> None:
        def on_admitted(error: BaseException | None) -> None:
            if admitted is not None and not admitted.done():
                admitted.set_result(None) if error is None else admitted.set_exception(error)

        for sink, e in zip(sinks, entries):
            self._sinks[e.request_id] = (sink, every_step)
        try:
            self.scheduler.offer(Group(entries, limited=limited, on_admitted=on_admitted))
        except Exception as e:  # the line is full: refused whole
            for entry in entries:
                self._sinks.pop(entry.request_id, None)
                self._owner.pop(entry.request_id, None)
            if admitted is not None:
                admitted.set_exception(e)
            else:
                sinks[0].put(Failed(e))

    def _feed(self) -> None:
        for group, error in self.scheduler.feed():
            for e in group.entries:
                entry = self._sinks.pop(e.request_id, None)
                self._owner.pop(e.request_id, None)
                if entry is not None:
                    entry[0].put(Failed(error))

    def _drop(self, rid: str) -> None:
        self._owner.pop(rid, None)
        if self._sinks.pop(rid, None) is not None:
            self.scheduler.cancel(rid)

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
            self.scheduler.started(ev.request_id)
            entry = self._sinks.get(ev.request_id)
            if entry is None:  # cancelled meanwhile
                continue
            sink, every_step = entry
            if ev.done:
                del self._sinks[ev.request_id]
                self._owner.pop(ev.request_id, None)
            if ev.done or every_step:
                sink.put(ev)

    def _refuse_waiting(self, error: BaseException) -> None:
        for group in self.scheduler.clear(limited_only=True):
            group.on_admitted(error)
            for e in group.entries:  # a group fed in part streams already: its tickets hear it too
                entry = self._sinks.pop(e.request_id, None)
                if entry is not None:
                    entry[0].put(Failed(error))

    def _fail_all(self, error: BaseException) -> None:
        for group in self.scheduler.clear():
            group.on_admitted(error)
        for rid, (sink, _) in list(self._sinks.items()):
            try:
                self.scheduler.cancel(rid)
            except Exception:  # the engine may be broken; the client still gets its error
                log.exception("cancel after failure")
            sink.put(Failed(error))
        self._sinks.clear()
        self._owner.clear()
        while self._calls:
            call = self._calls.popleft()
            if call.done.set_running_or_notify_cancel():
                call.done.set_exception(error)
