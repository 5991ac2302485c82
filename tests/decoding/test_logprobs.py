"""Token log-probabilities and logit_bias: in the engine, the AR decoder, and the server's OpenAI formats."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import tiny_model
from engine_helpers import ScriptedModel, sharp_model
from unmask.decoding.ar import ar_generate, ar_generate_batch
from unmask.decoding.engine import Engine
from unmask.decoding.options import DecodeOptions, OptionsError
from unmask.pipeline import Pipeline
from unmask.serve.app import create_app

PROMPTS = ["def f(x):", "import os\nclass Config:\n    def __init__(self):", "x = ["]


def renormalised(p: float, V: int) -> float:
    """A ScriptedModel token's log-probability once the mask token (never committed) is taken out."""
    rest = (1 - p) / (V - 1)
    return math.log(p / (1 - rest))


def test_engine_reports_the_probability_each_token_had_when_committed(tokenizer):
    V = tokenizer.vocab_size
    prompt = [5, 6, 7]
    probs = {i: 0.5 + 0.04 * i for i in range(8)}  # a different confidence per answer position
    model = ScriptedModel(tokenizer, lambda pos, cur: (100 + pos, probs.get(pos - len(prompt), 0.5)))
    # threshold 0.6: the first positions wait for later steps (below τ the policy commits one a step)
    o = DecodeOptions(max_new_tokens=8, block_length=8, threshold=0.6, logprobs=2)
    r = Engine(model).generate(prompt, o)
    assert r.tokens == [100 + len(prompt) + i for i in range(8)]
    assert r.logprobs == pytest.approx([renormalised(probs[i], V) for i in range(8)], abs=1e-5)
    for token, lp, top in zip(r.tokens, r.logprobs, r.top_logprobs):
        assert len(top) == 2 and top[0][0] == token and top[0][1] == pytest.approx(lp)
        p = probs[token - 100 - len(prompt)]
        assert top[1][1] == pytest.approx(math.log((1 - p) / (V - 1)) + lp - math.log(p), abs=1e-4)  # the rest
    plain = Engine(model).generate(prompt, o.replace(logprobs=None))
    assert plain.tokens == r.tokens and plain.logprobs is None and plain.top_logprobs is None


@pytest.mark.parametrize("decoder", ["engine", "ar"])
def test_logprobs_are_the_models_own_before_bias_and_penalties(tokenizer, decoder):
    V = tokenizer.vocab_size
    looping = ScriptedModel(tokenizer, lambda pos, cur: (50, 0.6))  # wants token 50 everywhere
    bias = {50: -100.0, 77: 1.0}  # among the equally likely rest, 77 is the choice
    if decoder == "ar":
        looping.config = dataclasses.replace(looping.config, attention="causal")
        r = ar_generate(looping, [5, 6], 6, logit_bias=bias, logprobs=1)
    else:
        r = Engine(looping).generate([5, 6], DecodeOptions(max_new_tokens=6, block_length=6, logit_bias=bias, logprobs=1))
    assert r.tokens == [77] * 6  # the bias overrules the model ...
    rest = math.log(0.4 / (V - 1))
    want_50 = math.log(0.6) if decoder == "ar" else renormalised(0.6, V)
    shift = 0.0 if decoder == "ar" else want_50 - math.log(0.6)
    assert r.logprobs == pytest.approx([rest + shift] * 6, abs=1e-4)  # ... but reports the model's view
    assert all(top[0] == (50, pytest.approx(want_50, abs=1e-4)) for top in r.top_logprobs)


@pytest.mark.parametrize("attention", ["block_causal", "causal"])
def test_logit_bias_steers_greedy_decoding(tokenizer, attention):
    pipe = Pipeline(tiny_model(tokenizer, attention=attention, seed=3), tokenizer)
    free = pipe.generate("def f(x):", max_new_tokens=8, block_length=8, heal=False)
    favourite = free.tokens[0]
    pushed = pipe.generate("def f(x):", max_new_tokens=8, block_length=8, heal=False, logit_bias={300: 100.0})
    assert pushed.tokens == [300] * 8
    banned = pipe.generate("def f(x):", max_new_tokens=8, block_length=8, heal=False,
                           logit_bias={favourite: -100.0})
    assert favourite not in banned.tokens
    with pytest.raises(OptionsError, match="outside the vocabulary"):
        pipe.generate("def f(x):", max_new_tokens=4, logit_bias={tokenizer.vocab_size: 1.0})
    with pytest.raises(OptionsError, match=r"\[-100, 100\]"):
        DecodeOptions(logit_bias={5: 250.0})
    with pytest.raises(OptionsError, match="logprobs"):
        DecodeOptions(logprobs=21)


def test_ar_logprobs_equal_a_teacher_forced_forward(tokenizer):
    """The AR twin's reported log-probabilities are its next-token distribution over prompt + answer,
    recomputed here in one plain forward pass (no cache, no batching)."""
    model = tiny_model(tokenizer, attention="causal", seed=2)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    results = ar_generate_batch(model, prompts, [7, 4, 9], temperature=0.8, seed=1, stop_at_eos=False, logprobs=3)
    for prompt, r in zip(prompts, results):
        seq = torch.tensor([prompt + r.tokens])
        with torch.no_grad():
            logprobs = model(seq).float().log_softmax(-1)[0, len(prompt) - 1 : -1]
        want = logprobs.gather(-1, torch.tensor(r.tokens)[:, None]).squeeze(-1)
        assert r.logprobs == pytest.approx(want.tolist(), abs=1e-4)
        top = logprobs.topk(3, dim=-1)
        assert [[t for t, _ in row] for row in r.top_logprobs] == top.indices.tolist()


def test_batched_engine_logprobs_equal_each_request_alone(tokenizer):
    model = sharp_model(tokenizer, attention="block_causal")
    o = DecodeOptions(max_new_tokens=12, block_length=4, threshold=0.7, logprobs=2)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    alone = [Engine(model).generate(p, o) for p in prompts]
    engine = Engine(model, max_batch=3)
    ids = [engine.submit(p, o) for p in prompts]
    results = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.done:
                results[ev.request_id] = ev.result
    for rid, solo in zip(ids, alone):
        assert results[rid].tokens == solo.tokens
        assert results[rid].logprobs == pytest.approx(solo.logprobs, abs=1e-4)
        assert [[t for t, _ in row] for row in results[rid].top_logprobs] == [[t for t, _ in row] for row in solo.top_logprobs]


# ---- server ------------------------------------------------------------------------------------------------
BODY = {"max_tokens": 12, "block_length": 4, "threshold": 0.5, "heal": False}


@pytest.fixture
def client(tiny_pipeline):
    with TestClient(create_app(tiny_pipeline, model_name="tiny")) as c:
        yield c


def sse_chunks(text: str) -> list[dict]:
    return [json.loads(e[len("data: "):]) for e in text.strip().split("\n\n") if e != "data: [DONE]"]


def test_completion_logprobs_in_the_legacy_format(client, tiny_pipeline):
    prompt = "def add(a, b):\n    return"
    body = client.post("/v1/completions", json={"prompt": prompt, "logprobs": 2, **BODY}).json()
    choice, usage = body["choices"][0], body["usage"]
    lp = choice["logprobs"]
    want = tiny_pipeline.generate(prompt, DecodeOptions(max_new_tokens=12, block_length=4, threshold=0.5, heal=False,
                                                        logprobs=2))
    assert len(lp["tokens"]) == usage["completion_tokens"] == len(want.tokens)
    assert lp["token_logprobs"] == pytest.approx(want.logprobs, abs=1e-5)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == value and len(top) <= 3  # the chosen token, with two alternatives
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][-1] < len(choice["text"]) or choice["text"].endswith("\ufffd")


def test_streamed_logprobs_add_up_to_the_whole_answers(client):
    req = {"prompt": "import os\nimport sys\n", "logprobs": 1, **BODY}
    whole = client.post("/v1/completions", json=req).json()["choices"][0]["logprobs"]
    chunks = sse_chunks(client.post("/v1/completions", json={**req, "stream": True}).text)
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(parts) > 1, "the answer should stream in several chunks, each with its tokens' logprobs"
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for p in parts for x in p[key]] == whole[key]


def test_chat_logprobs_with_bytes_and_alternatives(client):
    msgs = [{"role": "user", "content": "write a function"}]
    body = client.post("/v1/chat/completions", json={"messages": msgs, "logprobs": True, "top_logprobs": 2,
                                                     **BODY}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
    raw = bytes(b for entry in content for b in entry["bytes"])
    assert raw.decode("utf-8", errors="replace") == body["choices"][0]["message"]["content"]
    plain = client.post("/v1/chat/completions", json={"messages": msgs, **BODY}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_logit_bias_reaches_the_decoder(client, tokenizer):
    token = tokenizer.encode(" value")[0]
    body = client.post("/v1/completions", json={"prompt": "x =", "logit_bias": {str(token): 100}, **BODY}).json()
    assert body["choices"][0]["text"] == tokenizer.decode([token] * 12)


def test_a_rewritten_token_reports_the_probability_of_its_rewrite(tokenizer):
    # masks are filled with 50 (p 0.95); then the model prefers 51 (p 0.97) over 50, and keeps 51 (p 0.99)
    table = {50: (51, 0.97), 51: (51, 0.99)}
    model = ScriptedModel(tokenizer, lambda pos, cur: table.get(cur, (50, 0.95)) if pos >= 3 else (cur, 0.99))
    o = DecodeOptions(max_new_tokens=8, block_length=8, threshold=0.9, self_correct=True, rewrite_above=0.96,
                      max_correction_steps=4, logprobs=0)
    r = Engine(model).generate([5, 6, 7], o)
    assert r.tokens == [51] * 8 and r.steps_per_block == [3]  # fill, rewrite, a step that changes nothing
    V = tokenizer.vocab_size
    assert r.logprobs == pytest.approx([renormalised(0.97, V)] * 8, abs=1e-5)  # not the fill's 0.95 or the last 0.99
    assert r.top_logprobs == [[]] * 8


def test_diffusing_streams_carry_each_tokens_confidence(client):
    req = {"prompt": "def f(x):", "max_tokens": 12, "block_length": 4, "steps": 6, "stream": True,
           "diffusing": True, "logprobs": 0, "heal": False}
    chunks = [c for c in sse_chunks(client.post("/v1/completions", json=req).text) if c["choices"]]
    infos = [c["choices"][0]["diffusion"] for c in chunks]
    assert len(infos) == 6 and any(0 < i["masked"] < i["total"] for i in infos)
    for info in infos:
        assert len(info["confidence"]) == len(info["pieces"])
        for piece, c in zip(info["pieces"], info["confidence"]):
            assert (piece is None) == (c is None) and (c is None or 0 < c <= 1)
    final = chunks[-1]["choices"][0]
    assert final["finish_reason"] and final["diffusion"]["final"]
    want = [round(math.exp(lp), 4) for lp in final["logprobs"]["token_logprobs"]]
    assert final["diffusion"]["confidence"] == pytest.approx(want, abs=1e-4)
    # a token keeps the confidence it was committed with, from step to step
    for before, after in zip(infos, infos[1:-1]):
        assert all(b is None or b == a for b, a in zip(before["confidence"], after["confidence"]))
