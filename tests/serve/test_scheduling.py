"""Serving fairness: whole admission of a request's choices, edits as engine requests interleaved with
completions step by step, per-request banned tokens, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from engine_helpers import ScriptedModel
from unmask.decoding.contract import DecodeRequest
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions
from unmask.serve.app import create_app
from unmask.serve.runner import BackgroundServer
from unmask.serve.scheduler import Entry, Group, LineFull, Scheduler
from unmask.serve.schema import ServerLimits

openai = pytest.importorskip("openai")

FAST = {"max_tokens": 8, "steps": 4, "block_length": 8}


def slow_down(pipe, seconds: float):
    """Every forward pass takes a while, so requests are still running when the test acts."""
    return pipe.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def digits(lines: int) -> tuple[str, list[list[int]]]:
    """A text of `lines` assignments and a one-character span on each one's digit: an edit of many spans."""
    text, spans, pos = "", [], 0
    for i in range(lines):
        line = f"x{i} = {i % 10}\n"
        spans.append([pos + line.index("= ") + 2, pos + line.index("= ") + 3])
        text += line
        pos += len(line)
    return text, spans


def record_steps(engine) -> list[dict[str, bool]]:
    """Per engine step: the request ids it reported, each with whether it finished."""
    steps: list[dict[str, bool]] = []
    real = engine.step

    def step():
        events = real()
        steps.append({e.request_id: e.done for e in events})
        return events

    engine.step = step
    return steps


# ---- admission ---------------------------------------------------------------------------------------------

def fixed(n: int = 4) -> DecodeOptions:
    return DecodeOptions(max_new_tokens=n, steps=n, block_length=n, policy="fixed")


def choice(rid: str, prompt: list[int]) -> Entry:
    return Entry(DecodeRequest(prompt, fixed(), request_id=rid))


def test_groups_start_whole_in_arrival_order_and_a_full_line_refuses_whole(tiny_pipeline):
    engine = Engine(tiny_pipeline.model, max_batch=4, max_queue=64)
    line = Scheduler(engine, max_waiting=3)
    admitted = []
    line.offer(Group([choice(f"a{i}", [5, 6, 7]) for i in range(6)], on_admitted=lambda e: admitted.append(("a", e))))
    line.offer(Group([choice("b0", [8, 9])], on_admitted=lambda e: admitted.append(("b", e))))
    line.offer(Group([choice("c0", [10])]))
    with pytest.raises(LineFull) as refused:  # three requests wait: the fourth is turned away, whole
        line.offer(Group([choice("d0", [11]), choice("d1", [11])]))
    assert "queue full" in str(refused.value) and refused.value.retry_after > 0
    line.feed()
    assert engine.num_waiting == 4 and admitted == [("a", None)]  # only free rows are fed; a6's group is in
    started, step = {}, 0
    while engine.has_work() or line.has_work():
        line.feed()
        step += 1
        for ev in engine.step():
            started.setdefault(ev.request_id, step)
            line.started(ev.request_id)
        if step == 1:
            assert line.waiting == 3  # a's last two choices have not started: it still waits
    assert set(started) == {f"a{i}" for i in range(6)} | {"b0", "c0"}  # nothing of d ever reached the engine
    assert max(started[f"a{i}"] for i in range(6)) <= started["b0"] <= started["c0"]  # FIFO, groups whole
    assert line.waiting == 0
    line.offer(Group([choice("d0", [11])]))  # room again


def test_a_request_waiting_in_line_can_be_cancelled_before_it_reaches_the_engine(tiny_pipeline):
    engine = Engine(tiny_pipeline.model, max_batch=1, max_queue=64)
    line = Scheduler(engine, max_waiting=8)
    line.offer(Group([choice("a", [5])]))
    line.offer(Group([choice("b0", [6]), choice("b1", [6])]))
    line.feed()
    line.cancel("b0")
    line.cancel("b1")
    assert line.queued == 0 and line.waiting == 0  # b is gone; a has its batch row
    done = set()
    while engine.has_work() or line.has_work():
        line.feed()
        done |= {e.request_id for e in engine.step() if e.done}
    assert done == {"a"}


def test_five_requests_of_16_choices_all_complete_on_an_idle_server(tiny_pipeline):
    """The issue's case: max_batch 8, queue 64; 80 choices. Each request is admitted whole or waits whole."""
    app = create_app(tiny_pipeline, max_batch=8, max_queue=64)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json={"prompt": f"p{i}", "n": 16, **FAST})
                                          for i in range(5)])

    try:
        rs = asyncio.run(burst())
    finally:
        app.state.server.worker.stop()
    assert [r.status_code for r in rs] == [200] * 5, [r.text[:200] for r in rs]
    assert all(sorted(c["index"] for c in r.json()["choices"]) == list(range(16)) for r in rs)


def test_a_refused_request_never_reaches_the_engine_even_in_part(tiny_pipeline):
    engine = Engine(tiny_pipeline.model, max_batch=2, max_queue=1)  # one request may wait
    submitted = []
    real_submit = engine.submit

    def submit(*args, **kwargs):
        submitted.append(args[0].request_id)  # the worker submits typed requests (DecodeRequest)
        return real_submit(*args, **kwargs)

    engine.submit = submit
    hook = slow_down(tiny_pipeline, 0.03)
    app = create_app(tiny_pipeline, engine=engine)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/completions", json={"prompt": f"p{i}", "n": 3, **FAST})
                                          for i in range(4)])

    try:
        rs = asyncio.run(burst())
    finally:
        hook.remove()
        app.state.server.worker.stop()
    codes = [r.status_code for r in rs]
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    # no choice of a refused request was ever offered to the engine (ids repeat where its own queue was full)
    assert len(set(submitted)) == 3 * codes.count(200)
    for r in rs:
        if r.status_code == 429:
            assert "queue full" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) >= 1
        else:
            assert len(r.json()["choices"]) == 3


# ---- edits are engine requests -----------------------------------------------------------------------------

def test_a_completion_runs_between_the_steps_of_a_running_edit(tiny_pipeline):
    hook = slow_down(tiny_pipeline, 0.01)
    app = create_app(tiny_pipeline, model_name="tiny", limits=ServerLimits(max_spans=200))
    steps = record_steps(app.state.server.worker.engine)
    text, spans = digits(60)  # 180 masks, decoded one per step by a random model
    out = {}
    try:
        with BackgroundServer(app) as srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                                                         timeout=120) as client:
            edit = threading.Thread(target=lambda: out.update(
                edit=client.post("/edits", cast_to=object, body={"input": text, "spans": spans})))
            edit.start()
            t0 = time.monotonic()
            while not any(rid.startswith("edit-") for s in steps for rid in s) and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            completion = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=4)
            edit.join()
    finally:
        hook.remove()
    assert completion.usage.completion_tokens <= 4 and out["edit"]["choices"][0]["text"].startswith("x0 = ")
    mine = [i for i, s in enumerate(steps) if any(rid.startswith("req-") for rid in s)]
    edits = [i for i, s in enumerate(steps) if any(rid.startswith("edit-") for rid in s)]
    assert mine and len(mine) <= 8
    # the completion's steps fall inside the edit's: the edit neither waited for it nor made it wait
    assert min(edits) < min(mine) and max(mine) < max(edits)
    assert any(any(rid.startswith("edit-") for rid in steps[i]) for i in mine)  # batched with the edit


def test_banned_tokens_bind_one_request_not_the_batch_it_shares(tokenizer):
    """An edit bans special tokens for its own canvas only: a completion decoded in the same steps may write
    them. The scripted model wants token 3 everywhere."""
    wanted = 3
    engine = Engine(ScriptedModel(tokenizer, lambda pos, cur: (wanted, 0.99)), max_batch=2)
    m = tokenizer.mask_id
    engine.submit_canvas([40, 41, m, m, m, 42, 43], fixed(3), "edit", banned={wanted, tokenizer.eos_id})
    engine.submit([40, 41], fixed(3), request_id="completion")
    together, results = 0, {}
    while engine.has_work():
        events = engine.step()
        together += {e.request_id for e in events} == {"edit", "completion"}
        results.update({e.request_id: e.result for e in events if e.done})
    assert together >= 1
    assert wanted not in results["edit"].tokens[2:5] and results["edit"].tokens[5:] == [42, 43]
    assert results["completion"].tokens == [wanted] * 3


def test_server_edits_give_the_pipelines_tokens(tiny_pipeline):
    """Edits on the server denoise through the shared engine and probe / score through the worker thread:
    the same text as the pipeline's own edit, in every mode."""
    text = "def average(values):\n    total = sum(values)\n    return total / len(vaules)\n"
    s = text.index("vaules")
    opts = DecodeOptions(max_new_tokens=8, steps=4, policy="fixed")
    cases = [({"spans": [[s, s + 6]], "length": "search"}, dict(spans=[(s, s + 6)], length="search")),
             ({"mode": "auto", "max_rounds": 2}, dict(mode="auto", max_rounds=2)),
             ({"mode": "instruction", "instruction": "fix the typo"}, dict(mode="instruction", instruction="fix the typo"))]
    with TestClient(create_app(tiny_pipeline)) as client:
        for body, kwargs in cases:
            r = client.post("/v1/edits", json={"input": text, "max_tokens": 8, "steps": 4, **body})
            assert r.status_code == 200, r.text
            want = tiny_pipeline.edit(text, options=opts, **kwargs)
            assert r.json()["choices"][0]["text"] == want.text, body
        infill = client.post("/v1/completions", json={"prompt": "def f(x):\n    return ", "suffix": "\n\nf(1)\n",
                                                      **FAST}).json()
        assert infill["choices"][0]["text"] is not None


def test_a_disconnected_edit_leaves_the_engine_and_its_thread_ends(tiny_pipeline):
    hook = slow_down(tiny_pipeline, 0.01)
    app = create_app(tiny_pipeline, limits=ServerLimits(max_spans=200))
    worker = app.state.server.worker
    text, spans = digits(60)
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            body = {"input": text, "spans": spans, "stream": True, "diffusing": True}
            with http.stream("POST", "/v1/edits", json=body) as r:
                assert next(r.iter_lines()).startswith("data: ")
            t0 = time.monotonic()
            while (worker.num_active or worker._jobs) and time.monotonic() - t0 < 10:
                time.sleep(0.02)
            assert worker.num_active == 0 and not worker._jobs, "the edit kept decoding for a client that left"
            hook.remove()
            assert http.post("/v1/completions", json={"prompt": "next", **FAST}).status_code == 200
    finally:
        hook.remove()
