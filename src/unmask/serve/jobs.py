"""Edit jobs: an Instant Edit or infill running on a thread of its own, its model work done by the worker.

An edit is more than one denoising run (windows of a long file, rounds of auto mode, a length search with
its scoring), so it runs as ordinary code on its own thread. What it asks of the model goes to the worker
thread, which alone touches the model and the engine:

- its canvases become requests of the server's engine (`Job.__call__`, the edit's denoiser), each with the
  edit's banned tokens as its own restriction, decoded step by step together with everything else served;
- a plain forward pass (auto mode's probe, the length search's scoring) runs between two engine steps
  (`Job.model`: the model, whose calls go to the worker one at a time).

A job whose client has gone raises `Cancelled` at its next event or wait, and its engine requests are
dropped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol

import torch

from unmask.decoding.contract import CanvasRequest
from unmask.decoding.denoise import DenoiseOutput, denoise_output
from unmask.decoding.events import StepEvent
from unmask.decoding.options import DecodeOptions
from unmask.serve.commands import (CallOnWorker, Cancel, Cancelled, Command, Failed, JobDone, Message,
                                   SubmitCanvases, Ticket)

log = logging.getLogger(__name__)

# an edit: fn(on_step, denoiser) -> its result, run on the job's thread (serve/edits.py builds them)
EditFn = Callable[[Callable[[StepEvent], None], "Job"], object]


class JobHost(Protocol):
    """What a job needs of the worker thread (serve/worker.py), which imports this module."""

    idle_poll_s: float

    @property
    def model(self) -> torch.nn.Module: ...

    def post(self, command: Command) -> None: ...

    def job_finished(self, job: Job) -> None: ...


class WorkerModel:
    """The model as an edit job sees it: its attributes are the model's, and each call (a forward pass) runs
    on the worker thread between engine steps, under the caller's grad mode."""

    def __init__(self, model: torch.nn.Module, call: Callable[[Callable[[], Any]], Any]):
        self._model, self._call = model, call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        grad = torch.is_grad_enabled()

        def forward() -> Any:
            with torch.set_grad_enabled(grad):
                return self._model(*args, **kwargs)

        return self._call(forward)


class Job:
    """One edit job. `fn(on_step, denoiser)` is the edit; this object is its denoiser."""

    def __init__(self, worker: JobHost, ticket: Ticket, every_step: bool, fn: EditFn):
        self.worker, self.ticket, self.every_step, self.fn = worker, ticket, every_step, fn
        self.id = ticket.request_id
        self.cancelled = threading.Event()
        self.model = WorkerModel(worker.model, self.call)
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._run, name=f"unmask-{self.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    # --- the job thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            value = self.fn(self._on_step, self)
        except Cancelled:
            log.info("edit %s cancelled after %.2fs", self.id, time.perf_counter() - t0)
        except Exception as e:  # user errors (bad spans) and bugs alike go back to the client
            self.ticket.put(Failed(e))
        else:
            self.ticket.put(JobDone(value))
        finally:
            self.worker.job_finished(self)

    def _on_step(self, ev: StepEvent) -> None:
        if self.cancelled.is_set():
            raise Cancelled(self.id)
        if self.every_step:
            self.ticket.put(ev)

    def _wait(self, get: Callable[[float], Any]) -> Any:
        """get(timeout) until it answers, raising Cancelled once the client has gone."""
        while True:
            if self.cancelled.is_set():
                raise Cancelled(self.id)
            try:
                return get(self.worker.idle_poll_s)
            except (queue.Empty, concurrent.futures.TimeoutError):
                continue

    # --- the edit's denoiser ------------------------------------------------------------------------------
    def __call__(self, canvases: list[list[int]], options: DecodeOptions, on_step: Callable[[StepEvent], None] | None,
                 request_ids: list[str], banned: set[int]) -> list[DenoiseOutput]:
        """Denoise the canvases as one group of engine requests; events come back under `request_ids`."""
        rids = [f"{self.id}/{next(self._ids)}" for _ in canvases]
        names = dict(zip(rids, request_ids))
        sink: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.worker.post(SubmitCanvases(self, [CanvasRequest(list(c), options, set(banned), rid)
                                               for c, rid in zip(canvases, rids)], sink))
        results: dict[str, DenoiseOutput] = {}
        try:
            while len(results) < len(rids):
                item = self._wait(lambda timeout: sink.get(timeout=timeout))
                if isinstance(item, Failed):
                    raise item.error
                if on_step is not None:
                    on_step(dataclasses.replace(item, request_id=names[item.request_id]))
                if item.done:
                    results[item.request_id] = denoise_output(item.result)
        except BaseException:
            for rid in rids:
                if rid not in results:
                    self.worker.post(Cancel(rid))
            raise
        return [results[rid] for rid in rids]

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the worker thread, between engine steps; its value (or error) comes back here."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.worker.post(CallOnWorker(fn, done))
        try:
            return self._wait(lambda timeout: done.result(timeout=timeout))
        except Cancelled:
            done.cancel()  # not run yet: the worker skips it
            raise
