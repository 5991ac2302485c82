"""The server as a hostile client and an operator find it: over real HTTP (uvicorn on loopback), mostly with
the official `openai` client. Each test is one row of the fault table in docs/serve.md."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from unmask.serve.app import create_app
from unmask.serve.runner import BackgroundServer, ConnectionLimits

openai = pytest.importorskip("openai")

FAST = {"steps": 4, "block_length": 8}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **FAST}


def slow_down(pipe, seconds: float):
    return pipe.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


@pytest.fixture
def served(tiny_pipeline):
    """(server, OpenAI client) for the tiny model; no retries, so every status shows."""
    app = create_app(tiny_pipeline, model_name="tiny")
    with BackgroundServer(app) as srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                                                     timeout=60) as client:
        yield srv, client


def post(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict]:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


# ---- errors keep the connection -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bos_token", "eos_token", "pad_token", "add_generation_prompt"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_template_variable_the_server_sets_is_a_named_error_and_the_connection_stays_usable(served, name, stream):
    srv, _ = served
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    status, body = post(conn, "/v1/chat/completions", {**CHAT, "stream": stream, "chat_template_kwargs": {name: "x"}})
    assert status == 422 and body["error"]["param"] == "chat_template_kwargs", body
    assert f"'{name}' cannot be a chat template variable" in body["error"]["message"]
    sock = conn.sock
    status, body = post(conn, "/v1/chat/completions", CHAT)  # the same keep-alive connection
    assert status == 200 and conn.sock is sock


def test_a_bug_is_a_500_on_a_connection_that_stays_usable(served, tiny_pipeline, monkeypatch):
    srv, _ = served
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tiny_pipeline.tokenizer, "apply_chat_template", broken)
    status, body = post(conn, "/v1/chat/completions", CHAT)
    assert status == 500 and body["error"]["message"] == "internal error: RuntimeError: a bug"
    sock = conn.sock
    conn.request("GET", "/health")
    health = conn.getresponse()
    assert health.status == 200 and health.read() and conn.sock is sock

    def collides(*args, **kwargs):  # any variable the renderer sets itself, not only the names we know
        raise TypeError("render() got multiple values for keyword argument 'tools'")

    monkeypatch.setattr(tiny_pipeline.tokenizer, "apply_chat_template", collides)
    status, body = post(conn, "/v1/chat/completions", CHAT)
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"


# ---- metrics ------------------------------------------------------------------------------------------------

def test_metrics_labels_come_from_routes_not_from_what_clients_send(served):
    srv, client = served
    for i in range(300):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(f"model-{i}")
        if i == 0:
            first = httpx.get(srv.url + "/metrics").text
    metrics = httpx.get(srv.url + "/metrics").text
    assert "model-1" not in metrics and metrics.count("\n") == first.count("\n")  # no series added
    assert 'unmask_requests_total{endpoint="/v1/models/{model_id:path}",status="404"} 300.0' in metrics


# ---- shutdown -----------------------------------------------------------------------------------------------

SERVE = """
import sys, time, torch
torch.set_num_threads(1)
from unmask.pipeline import load
from unmask.serve import runner
from unmask.serve.app import create_app
pipe = load(sys.argv[1], device="cpu")
pipe.model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # streams still going at SIGTERM
runner.serve(create_app(pipe, model_name="tiny", max_batch=8, max_queue=64), "127.0.0.1", int(sys.argv[2]),
             "warning")
"""


def stream_outcome(url: str, outcomes: list) -> None:
    """A long streamed completion: (status, the last event before [DONE] or the error body)."""
    body = {"prompt": "def f(x):", "max_tokens": 128, "steps": 128, "block_length": 128, "stream": True}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = list(r.iter_lines())
            events = [line[6:] for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
            outcomes.append((r.status_code, json.loads(events[-1] if events else "".join(lines))))
    except httpx.HTTPError as e:
        outcomes.append((None, repr(e)))


def test_sigterm_with_16_streams_open_exits_within_5_seconds_and_says_why(saved_model_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from unmask.serve.runner import free_port

    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    proc = subprocess.Popen([sys.executable, str(script), str(saved_model_dir), str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        outcomes: list = []
        threads = [threading.Thread(target=stream_outcome, args=(url, outcomes)) for _ in range(16)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # 8 decoding (max_batch), 8 waiting for a row
            health = httpx.get(url + "/health", timeout=5).json()
            if health["active"] == 8 and health["queue_depth"] == 8:
                break
            time.sleep(0.1)
        assert (health["active"], health["queue_depth"]) == (8, 8), health
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        exit_seconds = time.monotonic() - t0
        for t in threads:
            t.join(10)
    finally:
        proc.kill()
    assert exit_seconds <= 5.0, exit_seconds  # the default --shutdown-timeout is 3 s
    refused = [o for o in outcomes if o[0] == 503]
    cancelled = [o for o in outcomes if o[0] == 200]
    assert len(refused) == 8 and len(cancelled) == 8, outcomes
    assert all("server shutting down: the request had not started" in o[1]["error"]["message"] for o in refused)
    assert all("cancelled after the 3 s shutdown timeout" in o[1]["error"]["message"] for o in cancelled)


# ---- slow clients -------------------------------------------------------------------------------------------

@pytest.fixture
def guarded(tiny_pipeline):
    """A server with short deadlines: headers in 1 s, a body in 1 s, at most 16 half-open connections."""
    app = create_app(tiny_pipeline, model_name="tiny")
    limits = ConnectionLimits(header_timeout=1.0, body_timeout=1.0, max_half_open=16)
    with BackgroundServer(app, limits=limits) as srv:
        yield srv


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def trickle(sock: socket.socket, data: bytes, pause: float) -> None:
    """Send `data` a piece at a time until the server closes the connection."""
    try:
        for i in range(len(data)):
            sock.sendall(data[i:i + 1])
            time.sleep(pause)
    except OSError:
        pass


def test_headers_sent_slowly_get_a_408_and_the_connection_is_closed(guarded):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-A: 1\r\nX-B: 2\r\n"
    with socket.create_connection((guarded.host, guarded.port)) as sock:
        t0 = time.monotonic()
        sender = threading.Thread(target=trickle, args=(sock, head, 0.2), daemon=True)
        sender.start()
        answer = read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 408") and b"headers: not received within 1 s" in answer
        assert time.monotonic() - t0 < 5
    with socket.create_connection((guarded.host, guarded.port)) as sock:  # one that sends nothing at all
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("sent", ["a byte at a time", "less than its Content-Length"])
def test_a_body_that_does_not_arrive_in_time_gets_a_408_and_the_connection_is_closed(guarded, sent):
    body = json.dumps({"prompt": "def f():", "max_tokens": 4}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body) + (0 if sent == "a byte at a time" else 100)))
    with socket.create_connection((guarded.host, guarded.port)) as sock:
        sock.sendall(head)
        threading.Thread(target=trickle, args=(sock, body, 0.2 if sent == "a byte at a time" else 0),
                         daemon=True).start()
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"body: not received within 1 s" in answer
    assert httpx.post(guarded.url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 4,
                                                              **FAST}).status_code == 200


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_half_open_connections_are_bounded_and_whole_requests_still_get_through(tiny_pipeline):
    app = create_app(tiny_pipeline, model_name="tiny")
    with BackgroundServer(app, limits=ConnectionLimits(header_timeout=60, max_half_open=16)) as srv:
        socks = []
        try:
            for i in range(300):  # each a request line and half its headers, never finished
                sock = socket.create_connection((srv.host, srv.port))
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                socks.append(sock)
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 4, **FAST})
            assert r.status_code == 200
            time.sleep(0.5)
            assert sum(still_open(s) for s in socks) <= 16
        finally:
            for s in socks:
                s.close()


# ---- admission ----------------------------------------------------------------------------------------------

def test_free_batch_rows_count_as_capacity_before_a_429(tiny_pipeline):
    """--max-queue 4 on an idle server with 8 batch rows: 8 concurrent completions all fit."""
    hook = slow_down(tiny_pipeline, 0.05)  # requests arrive while a step runs, as on a real model
    app = create_app(tiny_pipeline, model_name="tiny", max_batch=8, max_queue=4)
    codes: list = []
    start = threading.Barrier(8)
    try:
        with BackgroundServer(app) as srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused",
                                                         max_retries=0, timeout=60) as client:
            def one() -> None:
                start.wait()
                try:
                    client.completions.create(model="tiny", prompt="def f():", max_tokens=8, extra_body=FAST)
                    codes.append(200)
                except openai.APIStatusError as e:
                    codes.append(e.status_code)

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        hook.remove()
    assert codes == [200] * 8


# ---- requests the OpenAI client sends -----------------------------------------------------------------------

def test_openai_fields_that_change_nothing_here_are_accepted(served):
    _, client = served
    messages = [{"role": "user", "content": "Sort a list"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=4,
                                       metadata={"team": "a"}, store=False, reasoning_effort="low",
                                       service_tier="auto", extra_body=FAST)
    assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.UnprocessableEntityError) as e:  # null content is an assistant's only
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": None}], max_tokens=4)
    assert "content: null is only allowed in an assistant message" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:  # still type-checked
        client.chat.completions.create(model="tiny", messages=messages[:1], store="yes", max_tokens=4)
    assert e.value.param == "store"


def test_errors_name_the_field_the_client_sent(served):
    srv, client = served
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask, max_completion_tokens=100_000)
    assert e.value.param == "max_completion_tokens" and "- max_completion_tokens: " in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # the prompt alone fills the context
        client.completions.create(model="tiny", prompt="x " * 300, max_tokens=4)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 300}], max_tokens=4)
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=4,
                                  extra_body={"policy": "verify", "self_correct": True})
    assert e.value.param == "self_correct"
    r = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "x"}',
                   headers={"Content-Type": "application/jsonx"})
    assert r.status_code == 422 and "Content-Type: application/json (got 'application/jsonx')" in r.text


def test_an_empty_model_name_is_refused(served):
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt="def f():", max_tokens=4, extra_body=FAST)
    assert e.value.param == "model" and "model: empty" in e.value.message


def test_an_edit_with_no_spans_is_refused_not_run_in_auto_mode(served):
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/edits", cast_to=object, body={"input": "x = sum(vaules)\n", "spans": []})
    assert e.value.param == "spans" and "give at least one" in e.value.message


def test_the_docs_edit_examples_select_the_misspelt_word():
    docs = (Path(__file__).parents[2] / "docs" / "serve.md").read_text()
    examples = re.findall(r'\{"input": ("[^"]*"), "spans": (\[\[[\d, \[\]]+\]\])\}', docs)
    assert len(examples) >= 2
    for text, spans in examples:
        text, ((start, end),) = json.loads(text), json.loads(spans)
        assert text[start:end] == "vaules", (text, start, end)


# ---- edits share the model with the engine ------------------------------------------------------------------

def test_every_forward_pass_of_an_edit_runs_on_the_worker_thread(tokenizer):
    """A left-to-right model's edits score suffixes with forward passes of their own: run on the edit's thread,
    they raced the engine's steps (the adapter's gate is module state) and failed with IndexError under load."""
    from conftest import tiny_model
    from unmask.pipeline import Pipeline

    pipe = Pipeline(tiny_model(tokenizer, attention="block_causal", block_attention="causal", logits_shift=True,
                               adapter_rank=4, adapter_tokens="masks"), tokenizer)
    threads = set()
    pipe.model.register_forward_pre_hook(lambda module, args: threads.add(threading.current_thread().name))
    app = create_app(pipe, model_name="tiny")
    text = "def average(values):\n    return sum(values) / len(vaules)\n"
    start = text.index("vaules")
    with BackgroundServer(app) as srv:
        def complete() -> None:
            httpx.post(srv.url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 8, **FAST}, timeout=60)

        load = [threading.Thread(target=complete) for _ in range(4)]
        for t in load:
            t.start()
        r = httpx.post(srv.url + "/v1/edits", json={"input": text, "spans": [[start, start + 6]]}, timeout=120)
        for t in load:
            t.join()
    assert r.status_code == 200, r.text
    assert threads == {"unmask-worker"}, threads


# ---- memory -------------------------------------------------------------------------------------------------

def test_the_worker_gives_freed_memory_back_when_it_goes_idle(tiny_pipeline, monkeypatch):
    from unmask.serve import memory

    trims = []
    monkeypatch.setattr(memory, "trim", lambda: trims.append(time.monotonic()))
    app = create_app(tiny_pipeline, model_name="tiny")
    with BackgroundServer(app) as srv:
        for _ in range(3):  # three bursts in a row: one trim (at most one per TRIM_EVERY_S)
            assert httpx.post(srv.url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 4, **FAST},
                              timeout=60).status_code == 200
        time.sleep(0.5)
    assert len(trims) == 1


def test_the_allocator_is_bounded_where_glibc_runs():
    import platform

    from unmask.serve import memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory.bound_allocator() is True
    memory.trim()
