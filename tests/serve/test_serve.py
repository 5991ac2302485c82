"""The OpenAI-compatible server against a tiny random model: formats, usage, limits, queueing, disconnects."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from unmask.decoding.engine import Engine
from unmask.decoding.healing import heal
from unmask.decoding.options import DecodeOptions
from unmask.serve.app import create_app
from unmask.serve.logprobs import LogprobFormat
from unmask.serve.runner import BackgroundServer
from unmask.serve.text import MASK_PLACEHOLDER
from unmask.serve.schema import UNSUPPORTED, ApiError

# small, fast requests: 8 new tokens in 4 fixed steps
FAST = {"max_tokens": 8, "steps": 4, "block_length": 8}


@pytest.fixture
def client(tiny_pipeline):
    with TestClient(create_app(tiny_pipeline, model_name="tiny")) as c:
        yield c


def parse_sse(text: str) -> list:
    """OpenAI SSE: `data: <json>` events separated by blank lines, ending with `data: [DONE]`."""
    assert text.endswith("\n\n"), "an SSE stream ends with a blank line"
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def direct(pipe, prompt_ids, body, suffix_ids=None):
    """What the engine alone gives for the same request (greedy decoding is deterministic)."""
    opts = DecodeOptions(max_new_tokens=body["max_tokens"], steps=body.get("steps"), block_length=body["block_length"],
                         policy="fixed" if body.get("steps") else "threshold")
    return Engine(pipe.model).generate(prompt_ids, opts, suffix_ids=suffix_ids)


def slow_down(pipe, seconds: float):
    """Make every forward pass take a while, so requests are still running when the test acts."""
    return pipe.model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def test_models_health_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["max_model_len"] == 256
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"prompt": "def f(x):", **FAST}).raise_for_status()
    metrics = client.get("/metrics").text
    for name in ("unmask_requests_total", "unmask_completion_tokens_total", "unmask_nfe_total",
                 "unmask_queue_depth", "unmask_request_latency_seconds_bucket"):
        assert name in metrics
    assert 'unmask_requests_total{endpoint="/v1/completions",status="200"} 1.0' in metrics
    assert "unmask_nfe_total 4.0" in metrics  # 4 fixed steps = 4 forward passes
    page = client.get("/")
    assert page.status_code == 200 and "Instant Edit" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_completion_usage_matches_engine(client, tiny_pipeline):
    prompt = "import os\ndef main(argv):"
    r = client.post("/v1/completions", json={"prompt": prompt, **FAST, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    ids = tiny_pipeline.encode(prompt)
    want = direct(tiny_pipeline, ids, FAST)
    choice, usage = body["choices"][0], body["usage"]
    assert choice["text"] == tiny_pipeline.tokenizer.decode(want.tokens)
    assert usage["prompt_tokens"] == len(ids)
    assert usage["completion_tokens"] == len(want.tokens)
    assert usage["total_tokens"] == len(ids) + len(want.tokens)
    assert usage["nfe"] == want.nfe and usage["steps"] == want.steps == 4
    assert usage["tokens_per_step"] == pytest.approx(len(want.tokens) / 4, abs=1e-3)
    assert usage["seconds"] > 0
    assert choice["finish_reason"] == ("stop" if want.finish_reason == "eos" else "length")
    # token ids as the prompt give the same answer
    r2 = client.post("/v1/completions", json={"prompt": ids, **FAST})
    assert r2.json()["choices"][0]["text"] == choice["text"]


def test_stream_is_openai_sse_and_adds_up(client):
    req = {"prompt": "class Parser:\n    def", **FAST}
    full = client.post("/v1/completions", json=req).json()
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = parse_sse(r.text)
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    *content, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
    assert "".join(c["choices"][0]["text"] for c in content) == full["choices"][0]["text"]
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[-1] == full["choices"][0]["finish_reason"] and not any(finishes[:-1])
    # without include_usage there is no usage chunk
    plain = parse_sse(client.post("/v1/completions", json={**req, "stream": True}).text)
    assert all(c["choices"] for c in plain)
    # stream_options without stream: refused, as OpenAI does
    r = client.post("/v1/completions", json={**req, "stream_options": {"include_usage": True}})
    assert r.status_code == 422 and "only allowed when stream is true" in r.json()["error"]["message"]


def test_chat_completion_and_stream(client, tiny_pipeline):
    req = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}], **FAST}
    full = client.post("/v1/chat/completions", json=req).json()
    assert full["object"] == "chat.completion"
    message = full["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = tiny_pipeline.tokenizer.apply_chat_template([m for m in req["messages"]], add_generation_prompt=True)
    assert full["usage"]["prompt_tokens"] == len(tiny_pipeline.encode(prompt))
    chunks = parse_sse(client.post("/v1/chat/completions", json={**req, "stream": True}).text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == message["content"]
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"]


def test_chat_content_may_be_text_parts(client):
    parts = [{"type": "text", "text": "Sort "}, {"type": "text", "text": "a list"}]
    as_parts = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], **FAST})
    assert as_parts.status_code == 200, as_parts.text
    plain = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Sort a list"}], **FAST})
    assert as_parts.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": image}], **FAST})
    assert r.status_code == 422 and "image_url" in r.json()["error"]["message"]
    assert r.json()["error"]["message"].startswith("messages.0.content: ")


def test_chat_takes_max_completion_tokens(client):
    req = {"messages": [{"role": "user", "content": "Sort a list"}], "steps": 3, "block_length": 8}
    r = client.post("/v1/chat/completions", json={**req, "max_completion_tokens": 6, "max_tokens": 200})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 6 and r.json()["usage"]["steps"] == 3
    r = client.post("/v1/chat/completions", json={**req, "max_completion_tokens": 100_000})
    assert r.status_code == 400 and "100000" in r.json()["error"]["message"]


def test_diffusing_streams_every_state(client):
    req = {"prompt": "def area(r):", "max_tokens": 12, "steps": 6, "block_length": 12}
    full = client.post("/v1/completions", json=req).json()
    chunks = parse_sse(client.post("/v1/completions", json={**req, "stream": True, "diffusing": True}).text)
    states = [c["choices"][0] for c in chunks]
    infos = [s["diffusion"] for s in states]
    assert [i["step"] for i in infos] == list(range(1, 7))  # one state per denoising step
    masked = [i["masked"] for i in infos]
    assert masked[0] > 0 and masked == sorted(masked, reverse=True) and masked[-1] == 0
    for s, i in zip(states[:-1], infos[:-1]):
        assert len(i["pieces"]) == 12 and i["total"] == 12
        assert sum(p is None for p in i["pieces"]) == i["masked"] == s["text"].count(MASK_PLACEHOLDER)
        assert s["finish_reason"] is None
    assert states[-1]["text"] == full["choices"][0]["text"] and states[-1]["finish_reason"]
    assert infos[-1]["final"] and MASK_PLACEHOLDER not in states[-1]["text"]


def test_stop_sequences_cut_text_and_tokens(client, tiny_pipeline):
    req = {"prompt": "def main():\n    return", "max_tokens": 16, "steps": 8, "block_length": 16}
    free = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert len(free) >= 8, free
    stop = free[4:7]
    cut = free[: free.find(stop)]
    r = client.post("/v1/completions", json={**req, "stop": [stop, "never-appears"]}).json()
    assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
    n = r["usage"]["completion_tokens"]
    # the counted tokens are exactly those that produce the returned text
    tokens = direct(tiny_pipeline, tiny_pipeline.encode(req["prompt"]), req).tokens
    assert tiny_pipeline.tokenizer.decode(tokens[:n]).startswith(cut)
    assert not tiny_pipeline.tokenizer.decode(tokens[: n - 1]).startswith(cut) or n == 0
    streamed = parse_sse(client.post("/v1/completions", json={**req, "stop": stop, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == cut


def test_stop_sequence_saves_the_remaining_blocks(client):
    req = {"prompt": "def main():\n    return", "max_tokens": 32, "steps": 32, "block_length": 8}
    free = client.post("/v1/completions", json=req).json()
    stop = free["choices"][0]["text"][1:4]  # completed by the first block
    r = client.post("/v1/completions", json={**req, "stop": stop}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["nfe"] == 8 < free["usage"]["nfe"] == 32


def test_text_prompts_are_healed_like_the_pipeline(client, tiny_pipeline):
    prompt = 'def f(x):\n    """Return x."""\n'  # ends in a token that "\n   " extends
    req = {"prompt": prompt, **FAST}
    # one front end: max_tokens counts the new tokens after the healed one on both paths (the decoder writes
    # one more, its block widened to hold it)
    want = tiny_pipeline.generate(prompt, DecodeOptions(max_new_tokens=8, steps=4, block_length=8, policy="fixed"))
    assert tiny_pipeline.tokenizer.decode(want.tokens[:1]).startswith("\n")  # healing happened
    body = client.post("/v1/completions", json=req).json()
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["completion_tokens"] == want.completion_tokens == len(want.tokens) - 1 == 8
    streamed = parse_sse(client.post("/v1/completions", json={**req, "stream": True}).text)
    assert "".join(c["choices"][0]["text"] for c in streamed) == want.text
    states = parse_sse(client.post("/v1/completions", json={**req, "stream": True, "diffusing": True}).text)
    assert states[-1]["choices"][0]["text"] == want.text
    unhealed = client.post("/v1/completions", json={**req, "heal": False}).json()["choices"][0]["text"]
    assert unhealed == tiny_pipeline.generate(prompt, max_new_tokens=8, steps=4, block_length=8, policy="fixed",
                                              heal=False).text


@pytest.mark.parametrize("attention", ["block_causal", "causal"])
@pytest.mark.parametrize("healing", [True, False])
def test_server_and_pipeline_agree_on_max_tokens(tokenizer, attention, healing):
    """The same request gives the same text and the same count of new tokens through the server and through
    the pipeline, with healing on and off, for the diffusion engine and the AR queue alike."""
    from conftest import tiny_model
    from unmask.pipeline import Pipeline

    pipe = Pipeline(tiny_model(tokenizer, attention=attention, block_size=4), tokenizer)
    prompt = 'def f(x):\n    """Return x."""\n'
    options = DecodeOptions(max_new_tokens=6, steps=6, block_length=3, policy="fixed", heal=healing)
    want = pipe.generate(prompt, options)
    with TestClient(create_app(pipe, model_name="tiny")) as c:
        body = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "steps": 6, "block_length": 3,
                                               "policy": "fixed", "heal": healing}).json()
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["completion_tokens"] == want.completion_tokens
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens == len(tokenizer.encode(prompt))
    assert want.completion_tokens <= 6 and len(want.tokens) - want.completion_tokens == int(healing)


def test_penalties_reach_the_decoder(client, tiny_pipeline):
    req = {"prompt": "def main():\n    return", "heal": False, **FAST}
    texts = {client.post("/v1/completions", json=req).json()["choices"][0]["text"]}
    for fields in ({"frequency_penalty": 1.5}, {"presence_penalty": -1.0, "frequency_penalty": 0.5}):
        body = client.post("/v1/completions", json={**req, **fields}).json()
        o = DecodeOptions(max_new_tokens=8, steps=4, block_length=8, policy="fixed", heal=False, **fields)
        assert body["choices"][0]["text"] == tiny_pipeline.generate(req["prompt"], o).text
        texts.add(body["choices"][0]["text"])
    assert len(texts) > 1  # the penalties changed something


def test_openai_nullable_fields_take_null_as_their_default(client):
    nulls = {"n": None, "stream": None, "echo": None, "presence_penalty": None, "frequency_penalty": None,
             "logprobs": None, "logit_bias": None, "stop": None, "seed": None, "user": None, "stream_options": None}
    r = client.post("/v1/completions", json={"prompt": "def f(x):", **FAST, **nulls})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"  # stream: null is no stream
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **FAST, **nulls})
    assert chat.status_code == 200, chat.text


def test_suffix_infills_between(client, tiny_pipeline):
    req = {"prompt": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(1, 2))\n", **FAST}
    r = client.post("/v1/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    pre, suf = tiny_pipeline.encode(req["prompt"]), tiny_pipeline.encode(req["suffix"])
    want = direct(tiny_pipeline, pre, FAST, suffix_ids=suf)
    assert body["choices"][0]["text"] == tiny_pipeline.tokenizer.decode(want.tokens)
    assert body["usage"]["prompt_tokens"] == len(pre) + len(suf)


BAD_REQUESTS = [
    # (endpoint, body, expected status, text the error message must contain)
    ("/v1/completions", {"max_tokens": 4}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "threshold": 1.5}, 422, "threshold"),
    ("/v1/completions", {"prompt": "x", "policy": "best"}, 422, "policy"),
    ("/v1/completions", {"prompt": "x", "policy": "eb", "entropy_bound": -0.5}, 422, "entropy_bound"),
    ("/v1/completions", {"prompt": "x", "temprature": 0.5}, 422, "temprature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x " * 50, "max_tokens": 200}, 400, "max_tokens"),  # together exceed the context
    ("/v1/completions", {"prompt": "x " * 200, "max_tokens": 200}, 400, "prompt: 400 tokens"),  # alone, too
    ("/v1/completions", {"prompt": "x", "steps": 10**7}, 400, "steps"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 9}, 400, "n"),  # 18 choices: above the server's 16
    ("/v1/completions", {"prompt": ["x", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], [999999]]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 1, "echo": True}, 400, "does not score the prompt"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 422, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 422,
     "top_logprobs needs logprobs"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 422, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 422, "seed"),  # above torch's 64-bit seeds: was a 500
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "fill <|mask|> here"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "diffusing": True}, 400, "diffusing"),
    ("/v1/completions", {"prompt": "x", "block_length": 0}, 422, "block_length"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ("/v1/edits", {"input": "abc", "spans": [[2, 10]]}, 400, "span"),
    ("/v1/edits", {"input": "abc", "mode": "spans"}, 400, "spans"),
    ("/v1/edits", {"input": "abc", "mode": "instruction"}, 400, "instruction"),
    ("/v1/edits", {"input": "", "mode": "auto"}, 400, "input"),
]


def test_bad_requests_get_a_reason_and_server_keeps_serving(client):
    for endpoint, body, status, needle in BAD_REQUESTS:
        r = client.post(endpoint, json=body)
        assert r.status_code == status, (endpoint, body, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert needle in message, (body, message)
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"x" * 3_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    ok = client.post("/v1/completions", json={"prompt": "still alive?", **FAST})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0
    assert client.get("/health").json()["status"] == "ok"


def test_unknown_paths_and_methods_get_openai_error_bodies(client):
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405),
                                 ("GET", "/static/nope.js", 404)):
        r = client.request(method, path)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and f"{method} {path}" in error["message"], error
    assert "POST" in client.get("/v1/completions").headers["allow"]


def test_a_body_that_is_not_a_json_object_gets_a_clear_reason(client):
    cases = [  # (body, content type, text the message must contain)
        (b'{"prompt": "x",}', "application/json", "not valid JSON at character 15"),
        (b'{"prompt": "x"}', "application/x-www-form-urlencoded", "Content-Type: application/json"),  # curl -d
        (b'{"prompt": "x"}', None, "Content-Type: application/json"),
        (b"", "application/json", "empty"),
        (b'{"prompt": "caf\xe9"}', "application/json", "not valid UTF-8 (byte 15"),  # Latin-1 é
        (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json", "nested too deep"),
    ]
    for content, content_type, needle in cases:
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/v1/completions", content=content, headers=headers)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["message"].startswith("body: ") and needle in error["message"], error
        assert error["param"] == "body"
    assert client.post("/v1/completions", json={"prompt": "x", **FAST}).status_code == 200


def test_half_a_surrogate_pair_is_a_422_naming_the_field(client):
    """JSON can escape a lone surrogate ("\\ud83d"); no tokenizer can encode it (it was a 500)."""
    lone = '"a \\ud83d b"'
    for endpoint, body, field in (
        ("/v1/completions", f'{{"prompt": {lone}}}', "prompt"),
        ("/v1/completions", f'{{"prompt": "x", "suffix": {lone}}}', "suffix"),
        ("/v1/completions", f'{{"prompt": ["x", {lone}]}}', "prompt"),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": {lone}}}]}}', "messages.0.content"),
        ("/v1/edits", f'{{"input": {lone}, "mode": "auto"}}', "input"),
    ):
        r = client.post(endpoint, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["message"].startswith(f"{field}: ") and "surrogate" in r.json()["error"]["message"]
    pair = client.post("/v1/completions", content=b'{"prompt": "\\ud83d\\ude42 x", "max_tokens": 4, "steps": 2}',
                       headers={"content-type": "application/json"})
    assert pair.status_code == 200, pair.text  # an escaped pair is one character: fine


def test_queue_full_answers_429_then_recovers(tiny_pipeline):
    hook = slow_down(tiny_pipeline, 0.05)
    app = create_app(tiny_pipeline, engine=Engine(tiny_pipeline.model, max_batch=1, max_queue=1))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            rs = await asyncio.gather(*[http.post("/v1/completions", json={"prompt": f"p{i}", **FAST})
                                        for i in range(8)])
            after = await http.post("/v1/completions", json={"prompt": "after", **FAST})
            metrics = (await http.get("/metrics")).text
        return rs, after, metrics

    try:
        rs, after, metrics = asyncio.run(burst())
    finally:
        hook.remove()
        app.state.server.worker.stop()
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    rejected = [r for r in rs if r.status_code == 429]
    assert all("queue full" in r.json()["error"]["message"] and r.headers["retry-after"] for r in rejected)
    assert {r.json()["error"]["type"] for r in rejected} == {"rate_limit_error"}
    # the edit queue's 429 (an ApiError) is a rate-limit error too, as OpenAI types them
    assert ApiError("server busy", 429).type == "rate_limit_error" and ApiError("bad").type == "invalid_request_error"
    assert after.status_code == 200
    assert f'unmask_requests_total{{endpoint="/v1/completions",status="429"}} {len(rejected)}.0' in metrics


def test_client_disconnect_cancels_the_request(tiny_pipeline):
    hook = slow_down(tiny_pipeline, 0.05)
    app = create_app(tiny_pipeline)
    worker = app.state.server.worker
    long = {"prompt": "def long():", "max_tokens": 64, "steps": 64, "block_length": 64}  # ≥ 3 s when slowed
    try:
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            # streaming: read one chunk, then hang up
            with http.stream("POST", "/v1/completions", json={**long, "stream": True, "diffusing": True}) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            t0 = time.monotonic()
            while worker.num_active and time.monotonic() - t0 < 5.0:
                time.sleep(0.02)
            assert worker.num_active == 0, "the engine kept decoding for a client that left"
            steps_at_cancel = worker.steps
            # non-streaming: the client times out and closes the connection
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=long, timeout=1.0)
            t0 = time.monotonic()
            while worker.num_active and time.monotonic() - t0 < 5.0:
                time.sleep(0.02)
            assert worker.num_active == 0
            assert worker.steps - steps_at_cancel < 60, "the abandoned request ran to the end"
            metrics = http.get("/metrics").text
            assert 'unmask_requests_total{endpoint="/v1/completions",status="cancelled"} 2.0' in metrics
            assert 'status="200"' not in metrics  # neither request finished
            hook.remove()
            assert http.post("/v1/completions", json={"prompt": "next", **FAST}).status_code == 200
    finally:
        hook.remove()


def test_edits_keep_text_outside_the_span(client):
    text = "def average(values):\n    total = sum(values)\n    return total / len(vaules)\n"
    start = text.index("vaules")
    span = [start, start + len("vaules")]
    r = client.post("/v1/edits", json={"input": text, "spans": [span], "max_tokens": 8, "steps": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "edit"
    new = body["choices"][0]["text"]
    assert new.startswith(text[: span[0]]) and new.endswith(text[span[1]:])
    assert body["choices"][0]["spans"] == [span]
    assert new == text[: span[0]] + body["choices"][0]["replacements"][0] + text[span[1]:]
    assert body["usage"]["nfe"] >= 1 and body["usage"]["steps"] >= 1

    chunks = parse_sse(client.post("/v1/edits", json={"input": text, "spans": [span], "max_tokens": 8, "steps": 4,
                                                      "stream": True, "diffusing": True}).text)
    states, last = chunks[:-1], chunks[-1]
    assert states and MASK_PLACEHOLDER in states[0]["choices"][0]["text"]
    assert all(s["object"] == "edit.chunk" for s in chunks)
    assert last["choices"][0]["text"] == new and last["choices"][0]["finish_reason"] == "stop"


def test_bad_edit_spans_name_the_field(client):
    for spans in ([[-1, 2]], [[4, 2]], [[1, 4], [2, 5]], [[2, 10]]):
        r = client.post("/v1/edits", json={"input": "abcdef", "spans": spans})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["message"].startswith("spans: ") and error["param"] == "spans", error


def test_edit_markers_alone_select_spans_mode(client):
    text = "def average(values):\n    return sum(values) / len(<<<vaules>>>)\n"
    r = client.post("/v1/edits", json={"input": text, "max_tokens": 8, "steps": 4})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["mode"] == "spans"  # as the CLI and the pipeline: the marked region is rewritten
    start = text.index("<<<")
    assert choice["spans"] == [[start, start + len("vaules")]]
    assert choice["text"] == text[:start] + choice["replacements"][0] + text[text.index(">>>") + 3:]
    explicit = client.post("/v1/edits", json={"input": text, "mode": "spans", "max_tokens": 8, "steps": 4})
    assert explicit.status_code == 200 and explicit.json()["choices"][0]["spans"] == choice["spans"], explicit.text


def test_delta_stream_never_sends_text_it_must_take_back(tokenizer):
    """Tokens committed in random order (as diffusion does): deltas only grow the text, and their sum is the
    final text, cut at EOS and stop strings, even where a stop string or a UTF-8 character spans tokens."""
    import random

    from unmask.decoding.detokenize import DeltaStream, final_text

    mask, eos = tokenizer.mask_id, tokenizer.eos_id
    text = "naïve café → done; return x  # ok 🙂\n    return y\n"
    target = tokenizer.encode(text) + [eos, eos]
    for seed in range(20):
        rng = random.Random(seed)
        stop = rng.choice([[], ["return y"], ["e; r", "→"], ["🙂"], ["zzz"]])
        canvas = [mask] * len(target)
        deltas = DeltaStream(tokenizer, mask, eos, stop)
        sent = []
        for i in rng.sample(range(len(target)), len(target)):
            canvas[i] = target[i]
            sent.append(deltas.update(canvas))
        want, _, _ = final_text(tokenizer, target, eos, stop)
        sent.append(deltas.finish(want))
        assert "".join(sent) == want, (seed, stop)
        assert "\ufffd" not in "".join(sent[:-1])


def test_an_engine_failure_fails_its_requests_not_the_server(tiny_pipeline):
    app = create_app(tiny_pipeline)
    engine = app.state.server.worker.engine
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return real_step()

    engine.step = flaky_step
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "x", **FAST})
        assert r.status_code == 500 and "simulated device error" in r.json()["error"]["message"]
        assert engine.num_active == 0
        streamed = parse_sse(c.post("/v1/completions", json={"prompt": "x", **FAST, "stream": True}).text)
        assert streamed and "error" not in streamed[-1]  # the next requests are served normally
        assert c.post("/v1/completions", json={"prompt": "y", **FAST}).status_code == 200
        assert "simulated device error" in c.get("/health").json()["last_error"]


def test_default_max_tokens_shrinks_to_the_room_a_long_prompt_leaves(client):
    ids = [100 + i % 50 for i in range(256 - 5)]  # the tiny model's context is 256 tokens
    r = client.post("/v1/completions", json={"prompt": ids, "block_length": 8, "steps": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5
    # an explicit max_tokens is the client's word: too many is still an error naming it
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": ids + [100] * 5})  # no room left at all
    assert r.status_code == 400


def test_chat_template_kwargs_reach_the_template(client, tiny_pipeline, monkeypatch):
    """vLLM's chat_template_kwargs: e.g. enable_thinking=false closes an empty think block for Qwen3 models."""
    template = tiny_pipeline.tokenizer.chat_template + "{% if enable_thinking is false %}<think></think>{% endif %}"
    monkeypatch.setattr(tiny_pipeline.tokenizer, "chat_template", template)
    req = {"messages": [{"role": "user", "content": "Sort a list"}], **FAST}
    plain = client.post("/v1/chat/completions", json=req).json()["usage"]["prompt_tokens"]
    r = client.post("/v1/chat/completions", json={**req, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text
    think = tiny_pipeline.encode(tiny_pipeline.tokenizer.apply_chat_template(req["messages"], enable_thinking=False))
    assert r.json()["usage"]["prompt_tokens"] == len(think) > plain
    r = client.post("/v1/chat/completions", json={**req, "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 422 and "'messages' cannot be a chat template variable" in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=req).status_code == 200  # still serving


def test_batch_prompts_and_n_choices_in_openai_order(client, tiny_pipeline):
    """prompt: a list (texts or token-id lists) and n > 1: choice i * n + j is prompt i's sample j, each what
    its own request gives; usage counts each prompt once and every choice's tokens."""
    prompts = ["def f(x):", "import os\nimport sys"]
    body = {"prompt": prompts, "n": 2, **FAST}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [c["index"] for c in got["choices"]] == [0, 1, 2, 3]
    alone = [client.post("/v1/completions", json={"prompt": p, **FAST}).json() for p in prompts]
    for c in got["choices"]:
        assert c["text"] == alone[c["index"] // 2]["choices"][0]["text"]  # greedy: both samples agree
    usage = got["usage"]
    assert usage["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert usage["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)
    assert usage["nfe"] == 2 * sum(a["usage"]["nfe"] for a in alone)
    ids = [tiny_pipeline.encode(p) for p in prompts]  # token-id prompts: the same batch form
    by_ids = client.post("/v1/completions", json={"prompt": ids, **FAST, "heal": False}).json()
    assert [c["text"] for c in by_ids["choices"]] == [tiny_pipeline.tokenizer.decode(direct(tiny_pipeline, i, FAST).tokens)
                                                      for i in ids]


def test_seeded_samples_differ_and_each_is_reproducible(client):
    body = {"prompt": "def f(x):", "temperature": 1.0, "seed": 7, **FAST}
    two = client.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    assert two[0]["text"] != two[1]["text"]  # sample j draws with seed + j
    second = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]
    assert two[1]["text"] == second["text"]
    edge = client.post("/v1/completions", json={**body, "seed": 2**63 - 1, "n": 2})  # seed + 1 wraps around
    assert edge.status_code == 200, edge.text
    wrapped = client.post("/v1/completions", json={**body, "seed": -(2**63)}).json()["choices"][0]
    assert edge.json()["choices"][1]["text"] == wrapped["text"]


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_choices_carry_their_index(client, chat):
    if chat:
        endpoint, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    else:
        endpoint, body = "/v1/completions", {"prompt": ["def f(x):", "import os"]}
    body = {**body, "n": 2, **FAST, "temperature": 1.0, "seed": 3}
    full = client.post(endpoint, json=body).json()
    events = parse_sse(client.post(endpoint, json={**body, "stream": True, "stream_options": {"include_usage": True}}).text)
    texts, finished = {}, set()
    for e in events[:-1]:
        [c] = e["choices"]
        piece = c["delta"].get("content") if chat else c["text"]
        texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
        if c["finish_reason"]:
            finished.add(c["index"])
    expected = {c["index"]: c["message"]["content"] if chat else c["text"] for c in full["choices"]}
    assert texts == expected and finished == set(expected)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]


def test_echo_puts_each_prompt_before_its_answer(client, tiny_pipeline):
    prompts = ["def f(x):", "import os\n"]
    plain = client.post("/v1/completions", json={"prompt": prompts, **FAST}).json()["choices"]
    echoed = client.post("/v1/completions", json={"prompt": prompts, "echo": True, **FAST}).json()["choices"]
    assert [c["text"] for c in echoed] == [p + c["text"] for p, c in zip(prompts, plain)]
    ids = tiny_pipeline.encode("class A:")  # token ids echo as their text
    by_ids = [client.post("/v1/completions", json={"prompt": ids, "echo": echo, **FAST}).json()["choices"][0]["text"]
              for echo in (False, True)]
    assert by_ids[1] == tiny_pipeline.tokenizer.decode(ids) + by_ids[0]
    events = parse_sse(client.post("/v1/completions", json={"prompt": prompts[0], "echo": True, "stream": True,
                                                            **FAST}).text)
    assert events[0]["choices"][0]["text"] == prompts[0]
    assert "".join(e["choices"][0]["text"] for e in events) == echoed[0]["text"]
    frames = parse_sse(client.post("/v1/completions", json={"prompt": prompts[0], "echo": True, "stream": True,
                                                            "diffusing": True, **FAST}).text)
    assert all(f["choices"][0]["text"].startswith(prompts[0]) for f in frames)
    assert frames[-1]["choices"][0]["text"] == echoed[0]["text"]
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert chat.status_code == 400 and "echo" in chat.json()["error"]["message"]


def test_edits_of_one_file_share_the_servers_prefix_store(tokenizer, corpus_texts):
    """block_causal: Instant Edit runs on the worker thread, so it shares the engine's store — the second
    edit of a file reuses the context blocks the first one computed, and edits what a store-less
    pipeline edits."""
    from conftest import tiny_model
    from unmask.decoding.queues import request_queue
    from unmask.pipeline import Pipeline

    model = tiny_model(tokenizer, attention="block_causal", block_size=8)
    pipe = Pipeline(model, tokenizer)
    app = create_app(pipe, engine=request_queue(model, prefix_blocks=64))
    text = corpus_texts[2][:300] + "\ndef average(values):\n    return sum(values) / len(vaules)\n"  # fits the context
    start = text.index("vaules")
    with TestClient(app) as client:
        edited = []
        for span in ([start, start + 6], [text.index("sum(values)"), text.index("sum(values)") + 3]):
            body = {"input": text, "spans": [span], "max_tokens": 8, "steps": 4}
            edited.append((span, client.post("/v1/edits", json=body).json()["choices"][0]["text"]))
        stats = client.get("/health").json()["prefix_cache"]
    assert stats["reused"] > 0 and stats["computed"] > 0
    plain = Pipeline(model, tokenizer)
    for span, new in edited:
        want = plain.edit(text, spans=[tuple(span)], options=DecodeOptions(max_new_tokens=8, steps=4, policy="fixed"))
        assert new == want.text


def test_block_causal_server_reuses_a_shared_prompt_prefix(tokenizer, corpus_texts):
    from conftest import tiny_model
    from unmask.decoding.queues import request_queue
    from unmask.pipeline import Pipeline

    pipe = Pipeline(tiny_model(tokenizer, attention="block_causal", block_size=8), tokenizer)
    app = create_app(pipe, engine=request_queue(pipe.model, prefix_blocks=32))
    preamble = corpus_texts[1][:400]  # a long shared beginning, as a system prompt or a file
    with TestClient(app) as client:
        texts = []
        for tail in ("\ndef first(x):\n", "\nclass Second:\n"):
            body = {"prompt": preamble + tail, "max_tokens": 8, "block_length": 8, "heal": False}
            texts.append(client.post("/v1/completions", json=body).json()["choices"][0]["text"])
        stats = client.get("/health").json()["prefix_cache"]
        metrics = client.get("/metrics").text
    assert f"unmask_prefix_cache_reused_blocks {float(stats['reused'])}" in metrics
    assert stats["reused"] >= 8 and stats["computed"] >= stats["blocks"] > 0  # the second reused the preamble
    for tail, text in zip(("\ndef first(x):\n", "\nclass Second:\n"), texts):
        assert text == pipe.generate(preamble + tail, max_new_tokens=8, block_length=8, heal=False).text


# ---- what an OpenAI client expects ----------------------------------------------------------------------------


def test_models_retrieve_gives_the_listed_model_or_404(client):
    listed = client.get("/v1/models").json()["data"][0]
    assert client.get("/v1/models/tiny").json() == listed
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404, r.text
    assert r.json()["error"]["param"] == "model" and "'gpt-4' does not exist" in r.json()["error"]["message"]


def test_a_developer_message_is_a_system_instruction(client):
    def ask(role: str) -> dict:
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
        r = client.post("/v1/chat/completions", json={"messages": messages, **FAST})
        assert r.status_code == 200, r.text
        return r.json()

    developer, system = ask("developer"), ask("system")
    assert developer["usage"]["prompt_tokens"] == system["usage"]["prompt_tokens"]
    assert developer["choices"][0]["message"] == system["choices"][0]["message"]  # greedy: the same answer


STRICT = [  # (endpoint, body, the field the 422 names): OpenAI takes no "8" for 8 and no "yes" for true
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 8.0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, "n"),
    ("/v1/completions", {"prompt": "x", "seed": "7"}, "seed"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": 1}, "echo"),
    ("/v1/completions", {"prompt": "x", "heal": "false"}, "heal"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "true"}, "logprobs"),
    ("/v1/edits", {"input": "abcdef", "spans": [["1", 2]]}, "spans.0.0"),
]


@pytest.mark.parametrize("endpoint, body, field", STRICT, ids=[f for _, _, f in STRICT])
def test_numbers_and_booleans_are_strict(client, endpoint, body, field):
    r = client.post(endpoint, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field and r.json()["error"]["message"].startswith(f"{field}: ")


def test_an_integer_is_a_float(client):
    r = client.post("/v1/completions", json={"prompt": "x", "temperature": 0, "top_p": 1, **FAST})
    assert r.status_code == 200, r.text


FLOATS = [  # every float field, with a value of the right range when finite
    ("/v1/completions", "temperature"), ("/v1/completions", "top_p"), ("/v1/completions", "presence_penalty"),
    ("/v1/completions", "frequency_penalty"), ("/v1/completions", "threshold"), ("/v1/completions", "factor"),
    ("/v1/completions", "entropy_bound"), ("/v1/completions", "logit_bias.5"), ("/v1/edits", "strength"),
    ("/v1/edits", "flag_below"),
]


@pytest.mark.parametrize("endpoint, field", FLOATS, ids=[f for _, f in FLOATS])
def test_floats_must_be_finite(client, endpoint, field):
    """Python's JSON parser takes NaN and Infinity; a NaN was "less than or equal to 2"."""
    base = {"prompt": "x"} if endpoint == "/v1/completions" else {"input": "abc", "mode": "auto"}
    for value in ("NaN", "Infinity", "-Infinity"):
        name, _, key = field.partition(".")
        item = f'{{"{key}": {value}}}' if key else value
        body = json.dumps(base)[:-1] + f', "{name}": {item}}}'
        r = client.post(endpoint, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["message"] == f"{field}: Input should be a finite number", r.text
        assert r.json()["error"]["param"] == field


def test_an_edit_has_one_choice(client):
    r = client.post("/v1/edits", json={"input": "abcdef", "spans": [[1, 3]], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "n must be 1" in r.json()["error"]["message"]
    r = client.post("/v1/edits", json={"input": "abcdef", "spans": [[1, 3]], "n": 1, "max_tokens": 4, "steps": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text


def test_an_edit_has_a_bounded_number_of_spans(client):
    """Each span is denoised in turn (1,000 spans took 41.5 s): more than the server's 64 is a 400."""
    text = "ab" * 100
    spans = [[2 * i, 2 * i + 1] for i in range(65)]
    marked = " ".join("<<<x>>>" for _ in range(65))  # markers are spans too
    for body in ({"input": text, "spans": spans}, {"input": marked}):
        t0 = time.perf_counter()
        r = client.post("/v1/edits", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "spans", r.text
        assert r.json()["error"]["message"] == "spans: 65 spans is more than this server's limit of 64 per edit"
        assert time.perf_counter() - t0 < 5  # refused before any decoding


def test_healing_does_not_spend_max_tokens(client, tokenizer):
    """The healed prompt token is re-decoded in the prompt's place: max_tokens counts the tokens after it,
    and so does completion_tokens (the healed token is in prompt_tokens)."""
    token = tokenizer.encode("def")[0]
    assert tokenizer.encode("def") == [token]
    body = {"prompt": "import os\n", "max_tokens": 1, "logit_bias": {str(token): 100}}  # healing can't pick "def"
    healed, plain = (client.post("/v1/completions", json={**body, "heal": h}).json() for h in (True, False))
    assert plain["choices"][0]["text"] == "def"
    assert healed["choices"][0]["text"].endswith("def"), healed  # the healed token's text, then one new token
    for r in (healed, plain):
        assert r["usage"]["completion_tokens"] == 1
        assert r["usage"]["prompt_tokens"] == len(tokenizer.encode("import os\n"))


def test_a_healed_token_reports_the_text_the_client_sees(client, tokenizer):
    """The first answer token re-decodes the prompt's "\\n": it and its alternatives are listed without it."""
    prompt = "import os\n"
    healing = heal(tokenizer, tokenizer.encode(prompt), tokenizer.vocab_size)
    assert healing.removed == "\n"
    seen = {tokenizer.decode([i])[1:] for i in healing.allowed.nonzero().flatten().tolist()}
    body = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "logprobs": 5}).json()
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == body["choices"][0]["text"] and lp["text_offset"][:1] == [0]
    first, chosen = lp["top_logprobs"][0], lp["tokens"][0]
    assert first[chosen] == lp["token_logprobs"][0] and set(first) <= seen, first
    assert first.get("\n" + chosen) != first[chosen]  # not listed again as the token it was
    # chat's form, on given entries: the healed token and its alternatives less "\n"; "def" could not come first
    extensions = {tokenizer.decode([i]): i for i in healing.allowed.nonzero().flatten().tolist()}
    indent, newline, other = extensions["\n   "], extensions["\n"], tokenizer.encode("def")[0]
    fmt = LogprobFormat(tokenizer, chat=True, skip="\n")
    [entry] = fmt([indent], [(-0.5, [(indent, -0.5), (other, -0.7), (newline, -1.0)])])["content"]
    assert (entry["token"], entry["bytes"]) == ("   ", list(b"   "))
    assert [(a["token"], a["bytes"], a["logprob"]) for a in entry["top_logprobs"]] == [("   ", list(b"   "), -0.5),
                                                                                       ("", [], -1.0)]


def test_a_chunked_body_is_refused_once_it_passes_the_limit(tiny_pipeline):
    """A chunked body declares no Content-Length: it is read only up to the limit (2 MB), not all 50 MB."""
    app = create_app(tiny_pipeline)
    sent = []

    async def fifty_megabytes():
        for _ in range(50):
            sent.append(1_000_000)
            yield b" " * 1_000_000

    async def post():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            r = await http.post("/v1/completions", content=fifty_megabytes(),
                                headers={"content-type": "application/json"})
            ok = await http.post("/v1/completions", json={"prompt": "still serving", **FAST})
        return r, ok

    try:
        r, ok = asyncio.run(post())
    finally:
        app.state.server.worker.stop()
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "body" and "above the limit of 2000000 bytes" in r.json()["error"]["message"]
    assert sum(sent) <= 3_000_000
    assert ok.status_code == 200


def test_openai_features_we_do_not_have_are_named(client):
    chat = {"messages": [{"role": "user", "content": "hi"}], **FAST}
    asks = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
            "response_format": {"type": "json_object"}, "best_of": 2}
    for field, value in asks.items():
        r = client.post("/v1/chat/completions", json={**chat, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {"message": UNSUPPORTED[field], "type": "invalid_request_error", "param": field,
                                     "code": None}
    assert UNSUPPORTED["tools"] == "tools are not supported by this server"
    assert client.post("/v1/chat/completions", json={**chat, "tools": None}).status_code == 200  # null: not set
    r = client.post("/v1/chat/completions", json={**chat, "toolz": []})  # a typo is still an unknown field
    assert r.status_code == 422 and r.json()["error"]["param"] == "toolz"
