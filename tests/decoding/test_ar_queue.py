"""ARQueue: the engine's request-queue API for causal models (AR twins), and the server on top of it."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import tiny_model
from unmask.decoding.ar import ARQueue, ar_generate
from unmask.decoding.engine import QueueFull
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.pipeline import Pipeline
from unmask.serve.app import create_app

PROMPTS = ["def f(x):", "import os\nclass Config:\n    def __init__(self):", "x = [", "for i in range(10):"]


@pytest.fixture
def ar_model(tokenizer):
    return tiny_model(tokenizer, attention="causal", seed=4)


def run(queue: ARQueue) -> dict:
    results, seen = {}, {}
    while queue.has_work():
        for ev in queue.step():
            seen.setdefault(ev.request_id, []).append(ev)
            if ev.done:
                results[ev.request_id] = ev.result
    return results, seen


def test_requests_with_their_own_options_decode_as_each_would_alone(tokenizer, ar_model):
    options = [DecodeOptions(max_new_tokens=9),
               DecodeOptions(max_new_tokens=5, temperature=0.9, top_p=0.9, seed=7),
               DecodeOptions(max_new_tokens=12, frequency_penalty=0.8, logit_bias={300: 3.0}, logprobs=2),
               DecodeOptions(max_new_tokens=7, temperature=1.2, seed=11)]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    queue = ARQueue(ar_model, max_batch=4)
    ids = [queue.submit(p, o) for p, o in zip(prompts, options)]
    results, events = run(queue)
    for rid, p, o in zip(ids, prompts, options):
        alone = ar_generate(ar_model, p, o.max_new_tokens, o.temperature, o.top_k, o.top_p, o.seed,
                            frequency_penalty=o.frequency_penalty, logit_bias=o.logit_bias, logprobs=o.logprobs)
        got = results[rid]
        assert got.tokens == alone.tokens and got.finish_reason == alone.finish_reason and got.nfe == alone.nfe
        if o.logprobs is not None:
            assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        # one event per new token, each canvas the answer so far, the last one done
        assert [e.canvas for e in events[rid]][-1] == got.tokens and events[rid][-1].done
        assert [e.committed for e in events[rid][:-1]] == list(range(1, len(events[rid])))
    assert len({tuple(r.tokens) for r in results.values()}) == 4


def test_more_requests_than_rows_wait_cancel_and_queue_limits(tokenizer, ar_model):
    queue = ARQueue(ar_model, max_batch=2, max_queue=3)
    o = DecodeOptions(max_new_tokens=6)
    ids = [queue.submit(tokenizer.encode(p), o) for p in PROMPTS[:3]]
    with pytest.raises(QueueFull):
        queue.submit([5], o)
    queue.step()
    assert queue.num_active == 2 and queue.num_waiting == 1  # the third waits for a free place
    queue.cancel(ids[1])
    assert queue.num_active == 1
    queue.step()
    assert queue.num_active == 2 and queue.num_waiting == 0  # ... and takes the cancelled one's
    results, _ = run(queue)
    assert set(results) == {ids[0], ids[2]}  # a cancelled request reports nothing
    assert results[ids[2]].tokens == ar_generate(ar_model, tokenizer.encode(PROMPTS[2]), 6).tokens
    with pytest.raises(OptionsError, match="autoregressive"):
        queue.submit([5, 6], o, suffix_ids=[7])
    with pytest.raises(OptionsError, match="outside the vocabulary"):
        queue.submit([5, 6], o.replace(logit_bias={10**6: 1.0}))
    with pytest.raises(OptionsError, match="context"):
        queue.submit([5] * 250, o.replace(max_new_tokens=10))


def test_stop_checks_end_a_row_early(tokenizer, ar_model):
    prompt = tokenizer.encode(PROMPTS[0])
    free = ar_generate(ar_model, prompt, 10)
    queue = ARQueue(ar_model)
    rid = queue.submit(prompt, DecodeOptions(max_new_tokens=10), stop_when=lambda ids: len(ids) >= 4)
    results, _ = run(queue)
    assert results[rid].tokens == free.tokens[:4] and results[rid].finish_reason == "stop"


def test_the_server_serves_an_ar_twin(tokenizer, ar_model):
    pipe = Pipeline(ar_model, tokenizer)
    with TestClient(create_app(pipe, model_name="twin")) as client:
        body = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8}).json()
        assert body["choices"][0]["text"] == pipe.generate(PROMPTS[1], max_new_tokens=8).text
        assert body["usage"]["completion_tokens"] == body["usage"]["nfe"]  # one pass per token
        stream = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8, "stream": True}).text
        chunks = [json.loads(e[6:]) for e in stream.strip().split("\n\n") if e != "data: [DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
        r = client.post("/v1/edits", json={"input": "x = 1", "spans": [[0, 1]]})
        assert r.status_code == 400 and "diffusion model" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
        assert client.get("/health").json()["status"] == "ok"


def test_requests_join_a_running_batch_and_decode_as_alone(tokenizer, ar_model):
    """Continuous batching: a request arriving mid-batch takes a free place at once (its prompt fills the
    slots before the batch's next one), one too long to fit there waits (until the batch has advanced past
    its length, or ended) and those behind it wait in order, and a joiner whose answer runs past the cache
    grows it. Each writes what it writes alone."""
    long_prompt = tokenizer.encode(PROMPTS[1] * 3)
    first = tokenizer.encode(PROMPTS[1])
    queue = ARQueue(ar_model, max_batch=3)
    a = queue.submit(first, DecodeOptions(max_new_tokens=6))
    for _ in range(2):
        queue.step()
    b = queue.submit(tokenizer.encode(PROMPTS[0]), DecodeOptions(max_new_tokens=30, temperature=0.8, seed=5))
    c = queue.submit(long_prompt, DecodeOptions(max_new_tokens=5))
    d = queue.submit(tokenizer.encode(PROMPTS[3]), DecodeOptions(max_new_tokens=4, logprobs=1))
    queue.step()
    assert queue.num_active == 2 and queue.num_waiting == 2  # b joined; c's prompt does not fit yet, d waits behind it
    results, _ = run(queue)
    cases = {a: (first, 6, {}), b: (tokenizer.encode(PROMPTS[0]), 30, {"temperature": 0.8, "seed": 5}),
             c: (long_prompt, 5, {}), d: (tokenizer.encode(PROMPTS[3]), 4, {"logprobs": 1})}
    for rid, (prompt, n, kw) in cases.items():
        alone = ar_generate(ar_model, prompt, n, **kw)
        assert results[rid].tokens == alone.tokens and results[rid].nfe == alone.nfe, rid
        if "logprobs" in kw:
            assert results[rid].logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_a_batch_keeps_no_autograd_graph(tokenizer, ar_model):
    """The prefill runs without gradients: a graph there would hold every prompt activation (1.6 GB for
    8 HumanEval prompts on a 135M model) for as long as the batch decodes."""
    from unmask.decoding.ar import ARBatch, ARRow

    batch = ARBatch(ar_model, [ARRow(tokenizer.encode("def f(x):\n    return"), DecodeOptions(max_new_tokens=4))])
    assert not batch.logits.requires_grad and batch.cache.k.grad_fn is None
    batch.step()
    assert not batch.logits.requires_grad
