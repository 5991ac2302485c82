"""Admission for the server's engine: whole requests, in arrival order, fed into free batch rows.

A *group* is what one client request asks the engine for: its `n` choices (times its prompts), or one
denoising call of an edit job (one canvas, or a length search's candidates). A group is taken whole or not
at all: it joins the line while fewer than `max_waiting` requests wait (a request waits until its last
choice has a batch row: free rows are capacity, not a queue), and is otherwise refused with an estimate of
when to come back (`LineFull`, the server's 429 with Retry-After). Nothing is queued in part and rolled back.

The line feeds the engine only as batch rows free up, oldest group first and each group's choices in order,
so requests start in arrival order: 16 choices are not starved by single ones that came after them. An edit
job's groups join the same line without counting against `max_waiting` (the job was admitted already; its
later canvases must not fail half-way).

Fairness between requests then comes from the engine: each step decodes one step of every active row, so a
long edit and a 4-token completion share steps; neither waits for the other to end.
Used from the worker thread only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from unmask.decoding.contract import CanvasRequest, DecodeRequest, Decoder, QueueFull


class LineFull(QueueFull):
    """`max_waiting` requests are waiting already; `retry_after` seconds is when the line should have drained."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Entry:
    """One engine request of a group (its request_id set: the worker names every request it submits)."""
    request: DecodeRequest | CanvasRequest

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(eq=False)  # compared by identity: the line holds each group once
class Group:
    entries: list[Entry]
    limited: bool = True  # counts against max_waiting (client requests; not an admitted edit job's canvases)
    # called once, on the worker thread: None when its first entry is in the engine, or the error that refused it
    on_admitted: Callable[[BaseException | None], None] = lambda error: None
    fed: int = 0  # entries handed to the engine so far
    unstarted: int = field(init=False)  # entries that have not yet decoded a step

    def __post_init__(self) -> None:
        self.unstarted = len(self.entries)


class Scheduler:
    def __init__(self, engine: Decoder, max_waiting: int, rate_window: int = 64):
        self.engine = engine
        self.max_waiting = max_waiting
        self._line: deque[Group] = deque()  # groups with entries not yet in the engine
        self._unstarted: dict[str, Group] = {}  # request id -> its group, until its first step
        self._starts: deque[float] = deque(maxlen=rate_window)  # when recent entries started

    # --- what the worker asks ---------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests (limited groups) with a choice not yet handed to the engine: the line, not the batch rows
        its choices were fed into (the worker feeds each group as it arrives)."""
        return sum(1 for g in self._line if g.limited)

    @property
    def queued(self) -> int:
        """Engine requests still in the line (not yet handed to the engine)."""
        return sum(len(g.entries) - g.fed for g in self._line)

    def has_work(self) -> bool:
        return bool(self._line)

    def offer(self, group: Group) -> None:
        """Take the group whole (it is fed as rows free up) or refuse it whole with LineFull."""
        if not group.entries:
            raise ValueError("a group needs at least one engine request")
        if group.limited and self.waiting >= self.max_waiting:
            wait = self.retry_after()
            raise LineFull(f"queue full: {self.waiting} requests waiting (max_queue {self.max_waiting}); "
                           f"retry in {wait:.1f} s", wait)
        self._line.append(group)
        for e in group.entries:
            self._unstarted[e.request_id] = group

    def feed(self) -> list[tuple[Group, BaseException]]:
        """Hand line entries to the engine while it has free rows. Returns the groups an entry of which the
        engine refused (bad request), with the error: they are dropped whole, their fed entries cancelled."""
        failed = []
        while self._line and self._free_rows() > 0:
            g = self._line[0]
            entry = g.entries[g.fed]
            try:
                self.engine.submit(entry.request)
            except QueueFull:  # the engine's own queue is full: wait for the next step
                break
            except Exception as e:  # noqa: BLE001 (handed back: the worker fails the group's tickets)
                self._drop(g)
                g.on_admitted(e)
                failed.append((g, e))
                continue
            g.fed += 1
            if g.fed == 1:
                g.on_admitted(None)
            if g.fed == len(g.entries):
                self._line.popleft()
        return failed

    def started(self, request_id: str) -> None:
        """The engine reported this request's first step."""
        g = self._unstarted.pop(request_id, None)
        if g is not None:
            g.unstarted -= 1
            self._starts.append(time.monotonic())

    def cancel(self, request_id: str) -> None:
        """Forget one engine request, in the line or in the engine. Unknown ids are ignored."""
        g = self._unstarted.pop(request_id, None)
        if g is not None:
            g.unstarted -= 1
            fed = {e.request_id for e in g.entries[: g.fed]}
            if request_id not in fed:  # still in the line: take it out, keeping the group's order
                g.entries = [e for e in g.entries if e.request_id != request_id]
                if g.fed == len(g.entries) and g in self._line:
                    self._line.remove(g)
                return
        self.engine.cancel(request_id)

    def clear(self, limited_only: bool = False) -> list[Group]:
        """Drop every group in the line (the engine failed or the server stops), or only the client requests
        (`limited_only`: not the canvases of edits already running); returns them."""
        groups = [g for g in self._line if g.limited or not limited_only]
        for g in groups:
            self._drop(g)
        return groups

    def retry_after(self) -> float:
        """Seconds until every request waiting now has started all its choices, at the rate choices started
        lately (1 s when there is no rate yet). Not just until the first place frees: the refused clients
        come back spread over the time the line takes to drain, instead of all at once for one place."""
        ahead = sum(g.unstarted for g in self._groups_waiting())
        if not ahead or len(self._starts) < 2:
            return 1.0
        span = time.monotonic() - self._starts[0]
        rate = (len(self._starts) - 1) / max(span, 1e-3)
        return min(max(ahead / rate, 0.1), 60.0)

    # --- inside ---------------------------------------------------------------------------------------
    def _free_rows(self) -> int:
        return self.engine.capacity.free

    def _groups_waiting(self) -> Iterator[Group]:
        seen = set()
        for g in self._unstarted.values():  # insertion order: oldest first
            if g.limited and id(g) not in seen:
                seen.add(id(g))
                yield g

    def _drop(self, g: Group) -> None:
        for e in g.entries[: g.fed]:
            self.engine.cancel(e.request_id)
        for e in g.entries:
            self._unstarted.pop(e.request_id, None)
        g.unstarted = 0
        if g in self._line:
            self._line.remove(g)


def retry_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (as HTTP has it) and in milliseconds (as OpenAI's clients read first)."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
